"""Loop-aware FLOPs and bytes of a compiled XLA module, from its optimized HLO text.

XLA's cost analysis (`compiled.cost_analysis()`) counts the body of every while loop once,
whatever its trip count (HloCostAnalysis::HandleWhile), so a `lax.scan` over 9 Monte-Carlo
chunks contributes one chunk's FLOPs. `loop_costs` walks the optimized HLO, finds each while
loop's trip count and counts, following HloCostAnalysis:

  FLOPs: convolutions and dots (XLA TPU lowers dots to convolutions), 2 per multiply-add over
         the window positions that touch the input; one per result element of elementwise
         ops and per reduced element of reduces; transcendentals (exp, log, ...) not counted;
  bytes: operands + result of each instruction outside fusions, arrays in HBM only (a TPU
         layout's `S(n)`, n > 0, is on-chip memory): a first-order estimate of HBM traffic
         (XLA's TPU cost model counts differently; do not compare the two directly);

each loop once (`*_once`, XLA's convention) and at its trip count (`*_all`);
`extra_flops = flops_all - flops_once` is what to add to XLA's FLOPs. Trip counts come from
`backend_config` `known_trip_count` when present, else from the canonical counted loop
(`i = c0; while i < N: ...; i += 1`) the condition and body show; a loop whose count cannot be
read is counted once and listed in `unknown_trip_counts`.
"""
import dataclasses
import math
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
                'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 'token': 0}
_ARRAY = re.compile(r'([a-z][a-z0-9]*)\[([0-9,]*)\]')
_ARRAY_LAYOUT = re.compile(r'([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*(?:\([^)]*\)[^{}]*)*\})?')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s([a-z][a-z0-9\-_]*)\((.*)$')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
# Elementwise opcodes XLA's cost analysis counts as one FLOP per result element
# (transcendentals -- exp, log, tanh, sqrt, ... -- are a separate count, left out here too).
_ELEMENTWISE = {'add', 'subtract', 'multiply', 'divide', 'maximum', 'minimum', 'compare',
                'negate', 'abs', 'and', 'or', 'xor', 'not', 'shift-left', 'shift-right-logical',
                'shift-right-arithmetic', 'convert', 'clamp', 'select', 'sign', 'floor', 'ceil',
                'round-nearest-even', 'round-nearest-afz', 'remainder', 'is-finite', 'atan2',
                'popcnt', 'clz'}
# Instructions that move no data of their own.
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all',
         'while', 'call', 'conditional', 'opt-barrier', 'partition-id', 'replica-id'}


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  op: str
  args: str            # the text between the opcode's parentheses
  operands: List[str]  # the %names in it
  attrs: str
  root: bool


def _split_call(rest: str) -> Tuple[str, str]:
  """'a, b), attrs' -> ('a, b', 'attrs'): the operand list up to its closing parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    if ch in '({[':
      depth += 1
    elif ch in ')}]':
      depth -= 1
      if depth == 0:
        return rest[:i], rest[i + 1:].lstrip(', ')
  return rest, ''


def parse_hlo(text: str) -> Tuple[Dict[str, List[_Instr]], str]:
  """Computations of an HLO module text: {name: [instructions]}, and the entry's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      operands, attrs = _split_call(m.group(4))
      comps[current].append(_Instr(m.group(1), m.group(2), m.group(3), operands,
                                   re.findall(r'%([\w.\-]+)', operands), attrs,
                                   line.lstrip().startswith('ROOT')))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def shape_bytes(shape: str, hbm_only: bool = True) -> float:
  """Bytes of an HLO shape string (a tuple: the sum of its arrays). With `hbm_only`, arrays
  whose layout puts them in another memory space (`S(n)`, n > 0: on-chip memory on TPU) count
  0: only HBM traffic is what the roofline's bandwidth term is about."""
  total = 0.0
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
    if hbm_only and re.search(r'S\([1-9]', layout):
      continue
    total += _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _elements(shape: str) -> int:
  """Elements of an array shape (of all arrays, for a tuple)."""
  return sum(math.prod(int(d) for d in dims.split(',') if d)
             for _, dims in _ARRAY.findall(shape))


def _dims(shape: str) -> List[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def _window(attrs: str) -> Dict[str, List]:
  m = re.search(r'window=\{([^}]*)\}', attrs)
  fields = dict(kv.split('=', 1) for kv in m.group(1).split()) if m else {}
  pick = lambda key: [int(x) for x in fields[key].split('x')] if key in fields else None
  pads = ([tuple(int(v) for v in p.split('_')) for p in fields['pad'].split('x')]
          if 'pad' in fields else None)
  return {'size': pick('size'), 'stride': pick('stride'), 'pad': pads,
          'lhs_dilate': pick('lhs_dilate'), 'rhs_dilate': pick('rhs_dilate')}


def conv_flops(out_shape: str, lhs_shape: str, attrs: str) -> float:
  """2 x multiply-adds of an HLO convolution, valid window positions only (XLA's count)."""
  labels = re.search(r'dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)', attrs)
  lhs_l, _, out_l = labels.groups()
  lhs, out = _dims(lhs_shape), _dims(out_shape)
  groups = int((re.search(r'feature_group_count=(\d+)', attrs) or [0, 1])[1])
  batch_groups = int((re.search(r'batch_group_count=(\d+)', attrs) or [0, 1])[1])
  fma = (lhs[lhs_l.index('f')] // groups) * out[out_l.index('f')] * (
      lhs[lhs_l.index('b')] // batch_groups)
  w = _window(attrs)
  spatial = sorted(c for c in lhs_l if c.isdigit())
  for n, label in enumerate(spatial):
    size = w['size'][n] if w['size'] else 1
    stride = w['stride'][n] if w['stride'] else 1
    pad_low = w['pad'][n][0] if w['pad'] else 0
    base = w['lhs_dilate'][n] if w['lhs_dilate'] else 1
    dil = w['rhs_dilate'][n] if w['rhs_dilate'] else 1
    in_size, out_size = lhs[lhs_l.index(label)], out[out_l.index(label)]
    o = np.arange(out_size)
    valid = 0
    for k in range(size):
      idx = o * stride - pad_low + k * dil
      valid += int(np.sum((idx % base == 0) & (idx >= 0) & (idx // base < in_size)))
    fma *= valid
  return 2.0 * fma


def dot_flops(out_shape: str, lhs_shape: str, attrs: str) -> float:
  m = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', attrs)
  lhs = _dims(lhs_shape)
  k = math.prod(lhs[int(d)] for d in m.group(1).split(',') if d) if m else 1
  return 2.0 * math.prod(_dims(out_shape)) * k


@dataclasses.dataclass
class LoopCosts:
  flops_once: float = 0.0
  flops_all: float = 0.0
  bytes_once: float = 0.0
  bytes_all: float = 0.0
  loops: List[Dict] = dataclasses.field(default_factory=list)
  unknown_trip_counts: List[str] = dataclasses.field(default_factory=list)

  @property
  def extra_flops(self) -> float:
    return self.flops_all - self.flops_once

  @property
  def extra_bytes(self) -> float:
    return self.bytes_all - self.bytes_once


def _constant_value(i: Optional[_Instr]) -> Optional[int]:
  """The integer a scalar `constant(N)` instruction holds, else None."""
  if i is None or i.op != 'constant':
    return None
  m = re.fullmatch(r'\s*(-?\d+)\s*', i.args)
  return int(m.group(1)) if m else None


def _through_copies(name: str, defs: Dict[str, _Instr]) -> Optional[_Instr]:
  i = defs.get(name)
  while i is not None and i.op in ('copy', 'bitcast', 'convert') and i.operands:
    i = defs.get(i.operands[0])
  return i


def _trip_count(w: _Instr, comps: Dict[str, List[_Instr]], defs: Dict[str, _Instr]
                ) -> Optional[int]:
  """Iterations of the while instruction `w` (defined among `defs`), or None if unreadable."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', w.attrs)
  if m:
    return int(m.group(1))
  cond = comps[re.search(r'condition=%([\w.\-]+)', w.attrs).group(1)]
  body = comps[re.search(r'body=%([\w.\-]+)', w.attrs).group(1)]
  cdefs, bdefs = {i.name: i for i in cond}, {i.name: i for i in body}
  root = next(i for i in cond if i.root)
  direction = re.search(r'direction=(\w+)', root.attrs)
  if root.op != 'compare' or not direction or direction.group(1) not in ('LT', 'GT'):
    return None
  counter, limit = (_through_copies(o, cdefs) for o in root.operands)
  if direction.group(1) == 'GT':      # N > i
    counter, limit = limit, counter
  if counter is None or counter.op != 'get-tuple-element':
    return None
  index = int(re.search(r'index=(\d+)', counter.attrs).group(1))
  init = _through_copies(w.operands[0], defs) if w.operands else None
  if init is None or init.op != 'tuple' or index >= len(init.operands):
    return None
  start, stop = _constant_value(_through_copies(init.operands[index], defs)), \
      _constant_value(limit)
  broot = next(i for i in body if i.root)
  step = bdefs.get(broot.operands[index]) if broot.op == 'tuple' else None
  if (start is None or stop is None or step is None or step.op != 'add' or
      not any(_constant_value(_through_copies(o, bdefs)) == 1 for o in step.operands)):
    return None
  return max(stop - start, 0)


def _sliced_read(param: str, body: List[_Instr]) -> Optional[float]:
  """Bytes read of fusion parameter `param` when every use slices it, else None."""
  uses = [u for u in body if param in u.operands]
  if uses and all(u.op in ('dynamic-slice', 'slice') and u.operands[0] == param for u in uses):
    return sum(shape_bytes(u.shape) for u in uses)
  return None


def _in_place_update(out: _Instr, body_defs: Dict[str, _Instr]) -> Optional[Tuple[str, float]]:
  """(buffer parameter, update bytes) when fusion output `out` is a dynamic-update-slice of a
  fusion parameter (through bitcasts): XLA updates that buffer in place."""
  if out.op != 'dynamic-update-slice' or len(out.operands) < 2:
    return None
  buf = body_defs.get(out.operands[0])
  while buf is not None and buf.op == 'bitcast' and buf.operands:
    buf = body_defs.get(buf.operands[0])
  if buf is None or buf.op != 'parameter' or out.operands[1] not in body_defs:
    return None
  return buf.name, shape_bytes(body_defs[out.operands[1]].shape)


def _access_bytes(i: _Instr, defs: Dict[str, _Instr], comps: Dict[str, List[_Instr]]) -> float:
  """HBM bytes instruction `i` (outside fusions) reads and writes: operands + result, except
  that slicing reads only the slice and a dynamic-update-slice writes only the update in place
  (as XLA's HloCostAnalysis counts them). Without this a `scan` over stacked layer weights
  [L, ...] would count the whole stack on every iteration, L times the real traffic."""
  operand = lambda o: shape_bytes(defs[o].shape) if o in defs else 0.0
  if i.op in ('dynamic-slice', 'slice'):
    return 2 * shape_bytes(i.shape)
  if i.op == 'dynamic-update-slice' and len(i.operands) > 1:
    return 2 * operand(i.operands[1])
  fused = re.findall(r'calls=%([\w.\-]+)', i.attrs) if i.op == 'fusion' else []
  if not fused or fused[0] not in comps:
    return shape_bytes(i.shape) + sum(operand(o) for o in i.operands)
  body = comps[fused[0]]
  body_defs = {b.name: b for b in body}
  params = {int(b.args.strip()): b.name for b in body if b.op == 'parameter'}
  root = next(b for b in reversed(body) if b.root)
  outputs = [body_defs[o] for o in root.operands if o in body_defs] if root.op == 'tuple' \
      else [root]
  in_place, written = set(), 0.0
  for out in outputs:
    update = _in_place_update(out, body_defs)
    if update:
      in_place.add(update[0])
      written += update[1]
    else:
      written += shape_bytes(out.shape)
  read = 0.0
  for k, o in enumerate(i.operands):
    param = params.get(k)
    if param in in_place:
      continue
    sliced = _sliced_read(param, body) if param else None
    read += operand(o) if sliced is None else sliced
  return written + read


def loop_costs(text: str) -> LoopCosts:
  """Matmul FLOPs and bytes of the module in HLO `text`, loops once and at their trip counts."""
  comps, entry = parse_hlo(text)
  out = LoopCosts()
  memo: Dict[Tuple[str, bool], Tuple[float, float]] = {}

  def called(attrs: str, key: str) -> List[str]:
    return re.findall(key + r'=%([\w.\-]+)', attrs)

  def cost(name: str, loops: bool, fused: bool) -> Tuple[float, float]:
    """(FLOPs, bytes) of one run of computation `name`; bytes only outside fusions."""
    if (name, loops, fused) in memo:
      return memo[(name, loops, fused)]
    instrs = comps[name]
    defs = {i.name: i for i in instrs}
    flops = nbytes = 0.0
    for i in instrs:
      if i.op == 'convolution' and i.operands:
        flops += conv_flops(i.shape, defs[i.operands[0]].shape, i.attrs)
      elif i.op == 'dot' and i.operands:
        flops += dot_flops(i.shape, defs[i.operands[0]].shape, i.attrs)
      elif i.op in _ELEMENTWISE:
        flops += _elements(i.shape)
      elif i.op == 'reduce' and i.operands:
        half = len(i.operands) // 2            # variadic reduce: inputs, then init values
        flops += sum(_elements(defs[o].shape) for o in i.operands[:half] if o in defs) - \
            _elements(i.shape)
      if not fused and i.op not in _FREE:
        nbytes += _access_bytes(i, defs, comps)
      if i.op == 'while':
        trip = _trip_count(i, comps, defs)
        if trip is None and not loops:
          out.unknown_trip_counts.append(i.name)
        n = (trip if trip is not None else 1) if loops else 1
        for sub in called(i.attrs, 'body') + called(i.attrs, 'condition'):
          f, b = cost(sub, loops, False)
          flops, nbytes = flops + n * f, nbytes + n * b
        if not loops:
          out.loops.append({'name': i.name, 'trip_count': trip,
                            'body_flops': cost(called(i.attrs, 'body')[0], True, False)[0]})
      elif i.op == 'conditional':
        branches = re.findall(r'%([\w.\-]+)', (re.search(r'branch_computations=\{([^}]*)\}',
                                                         i.attrs) or [0, ''])[1])
        branches += called(i.attrs, 'true_computation') + called(i.attrs, 'false_computation')
        costs = [cost(b, loops, fused) for b in branches if b in comps]
        if costs:
          flops += max(c[0] for c in costs)
          nbytes += max(c[1] for c in costs)
      else:
        for sub in called(i.attrs, 'calls') + called(i.attrs, 'to_apply'):
          if sub in comps:
            f, b = cost(sub, loops, fused or i.op != 'call')
            flops, nbytes = flops + f, nbytes + b
    memo[(name, loops, fused)] = (flops, nbytes)
    return flops, nbytes

  out.flops_once, out.bytes_once = cost(entry, False, False)
  out.flops_all, out.bytes_all = cost(entry, True, False)
  return out
