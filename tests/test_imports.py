"""Package dependency rules, read from every module's import statements (`ast`, nothing is
imported): every arrow points one way. Configs and launch sit above the libraries and name
them; no library imports a config or launch (a library's own command-line entry point, such as
`python -m evaluation.ood`, uses `training.cli`), and evaluation sits above training (it restores and runs
trained models), so training never imports evaluation: the train loop that uses both is
`launch/train.py`."""
import ast
import os

import pytest

from tests.helpers import ROOT

LIBRARIES = ('backbones', 'heads', 'hetxl', 'llc', 'soc', 'input_pipeline', 'training',
             'evaluation')

# rule name: ((package, packages it must not import), ...)
RULES = {
    'libraries do not import configs': tuple((lib, ('configs',)) for lib in LIBRARIES),
    # the tools' shared command-line helpers are `training.cli` and `training.distributed`
    'libraries do not import launch': tuple((lib, ('launch',)) for lib in LIBRARIES),
    'llc does not import configs': (('llc', ('configs',)),),
    'training does not import evaluation': (('training', ('evaluation',)),),
}


def imports(path: str):
  """(line, imported module, statement) of every absolute import in the file at `path`,
  function-level (lazy) imports included."""
  with open(path) as f:
    source = f.read()
  for node in ast.walk(ast.parse(source, path)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    else:
      continue
    for name in names:
      yield node.lineno, name, ast.get_source_segment(source, node)


def violations(root: str, package: str, forbidden: tuple) -> list[str]:
  """'file:line: statement' for each import in `root/package/**.py` of a package in
  `forbidden` (the module itself or any of its submodules)."""
  found = []
  for dirpath, _, files in os.walk(os.path.join(root, package)):
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      path = os.path.join(dirpath, name)
      for line, module, statement in imports(path):
        if module.split('.')[0] in forbidden:
          found.append(f'{os.path.relpath(path, root)}:{line}: {statement}')
  return sorted(found)


@pytest.mark.parametrize('rule', list(RULES))
def test_package_dependency_rule(rule):
  found = [v for package, forbidden in RULES[rule]
           for v in violations(ROOT, package, forbidden)]
  assert not found, f'{rule}, broken by:\n' + '\n'.join(found)


def test_violations_name_file_line_and_import(tmp_path):
  """The checker itself: a lazy and a top-level import of a forbidden package are reported
  with file and line; an allowed one and a mere mention in a string are not."""
  pkg = tmp_path / 'llc'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / 'a.py').write_text('import numpy as np\nfrom configs import base\n')
  (pkg / 'sub' / 'b.py').write_text(
      '"""from configs import x"""\n\ndef f():\n  import configs.resolve as r\n  return r\n')
  (pkg / 'c.py').write_text('from heads import registry\nfrom . import a\n')
  assert violations(str(tmp_path), 'llc', ('configs',)) == [
      'llc/a.py:2: from configs import base',
      'llc/sub/b.py:4: import configs.resolve as r']
  assert violations(str(tmp_path), 'llc', ('training',)) == []
