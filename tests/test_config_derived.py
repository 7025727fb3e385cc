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
