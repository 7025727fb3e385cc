"""Entry points: `python -m launch.main` (train / eval) and `python -m launch.prepare_data`."""
