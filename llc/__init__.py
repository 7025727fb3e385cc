"""LLC: learnt low-dimensional binary class codes (packing, decoding, retrieval, baselines)."""
