"""Classification heads sharing one interface (see `heads.base`)."""
