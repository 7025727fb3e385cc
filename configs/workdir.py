r"""The config a workdir was trained with: its `config.json`, as a config file.

  python -m launch.main --mode=eval --workdir=W                      # uses W/config.json
  python -m llc.evaluate --workdir=W
  python -m launch.main --mode=eval --config=configs/workdir.py:W --workdir=W \
      --config.eval.max_examples=500                                 # overrides apply as usual

Read-only tools (`--mode=eval`, `llc.evaluate`, `llc.ood`, `llc.taxonomy`,
`evaluation.reference_probs`, ...) given no `--config` use this one
(`training.cli.default_to_workdir`), so nothing given at training time has to be repeated. The
saved config is already resolved (`training.resolve`): its data facts and derived values are
what the run used.
"""
import ml_collections

from training.workdir import load_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config saved in workdir `arg` (its config.json, `training.workdir.load_config`)."""
  if not arg:
    raise ValueError('configs/workdir.py needs the workdir: --config=configs/workdir.py:WORKDIR')
  return load_config(arg)
