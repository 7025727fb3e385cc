"""Experiment configs: one file per experiment, `get_config(arg)` -> ml_collections.ConfigDict.

Shared: `schema.py` (every field and its default), `base.py` (typed variant arguments, the one
`:runlocal`, recipes, head setters), `llc_phases.py` (the LLC configs' phase wiring);
`workdir.py` is the config a workdir was trained with. Configs name library modules by string
and import libraries; no library imports a config (tests/test_imports.py).
"""
