"""What `config derived` says about the input (training/resolve.py, issue 28 point 7): the
augmentation applied and any resize, on the first resolve only."""
from tests.helpers import FACTS, load_config
from training.resolve import resolve


def _derived(capsys, arg, **input_fields):
  c = load_config('compare_heads.py', arg)
  c.dataset.update(FACTS['cifar10'], image_size=28)
  c.input.update(input_fields)
  resolve(c, with_data=False)
  out = capsys.readouterr().out
  assert out.startswith('config derived: ')
  return c, out


def test_config_derived_names_the_augmentation_and_the_resize(capsys):
  c, out = _derived(capsys, 'epochs=1')
  assert 'train augmentation cifar (pad 4 + random crop + random horizontal flip; ' in out
  assert 'resized' not in out   # input.image_size 0: the stored size
  c, out = _derived(capsys, 'epochs=1,augment=none', image_size=32)
  assert c.input.train_augment == 'none' and 'train augmentation none (no augmentation' in out
  assert 'images resized from the stored 28px to 32 x 32 (input.image_size)' in out
  resolve(c, with_data=False)   # resolving again: nothing derived, nothing printed
  assert capsys.readouterr().out == ''


def test_compare_heads_compare_is_one_run_per_head_and_cpu_is_a_smaller_recipe():
  """Issue 28 points 2 and 5: `compare` builds a run of every head (launch.runs trains them
  one after the other and prints one table); `cpu` is ResNet-18 at width 0.25 with 100 eval
  MC samples, the same recipe otherwise; `width=` still wins; compare refuses head=."""
  import pytest
  from configs import compare_heads
  runs = load_config('compare_heads.py', 'data=/d,compare,cpu,epochs=2').runs
  assert sorted(runs) == sorted(compare_heads.COMPARED)   # a ConfigDict keeps keys sorted
  alone = {h: load_config('compare_heads.py', f'data=/d,head={h},cpu,epochs=2')
           for h in compare_heads.COMPARED}
  for head, c in runs.items():
    assert c.to_dict() == alone[head].to_dict()
    assert c.model.backbone_kwargs.width == 0.25 and c.train.log_every == 10
  assert runs['hetxl'].model.head_kwargs.eval_mc_samples == 100
  full = load_config('compare_heads.py', 'data=/d,head=hetxl')
  assert full.model.backbone_kwargs.width == 1.0 and full.model.head_kwargs.eval_mc_samples == 1000
  assert load_config('compare_heads.py', 'cpu,width=0.5').model.backbone_kwargs.width == 0.5
  with pytest.raises(ValueError, match='compare trains every head'):
    load_config('compare_heads.py', 'compare,head=det')

