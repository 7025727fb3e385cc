"""Numpy/Pillow image transforms on uint8 [H, W, C] arrays.

Random ops take a `np.random.Generator` (what grain's `random_map` passes), so they are
deterministic given its state. Resizing is Pillow bilinear (antialiased when downscaling).
"""
import io
import math
from typing import Sequence, Union

import numpy as np
from PIL import Image

Size = Union[int, Sequence[int]]  # an int s means (s, s); else (height, width)
_MODES = {1: 'L', 3: 'RGB', 4: 'RGBA'}


def _hw(size: Size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def _to_pil(img: np.ndarray) -> Image.Image:
  return Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)


def _from_pil(im: Image.Image) -> np.ndarray:
  arr = np.asarray(im)
  return arr[..., None] if arr.ndim == 2 else arr


def _open(image_bytes: bytes, channels: int) -> Image.Image:
  if channels not in _MODES:
    raise ValueError(f'channels must be one of {sorted(_MODES)}, got {channels}.')
  return Image.open(io.BytesIO(image_bytes))


def _convert(im: Image.Image, channels: int) -> Image.Image:
  mode = _MODES[channels]
  return im if im.mode == mode else im.convert(mode)


def decode(image_bytes: bytes, channels: int = 3) -> np.ndarray:
  """Decodes JPEG/PNG/... bytes to uint8 [H, W, channels] (channels 1, 3 or 4)."""
  return _from_pil(_convert(_open(image_bytes, channels), channels))


def resize(img: np.ndarray, size: Size) -> np.ndarray:
  """Bilinear resize to `size` ((s, s) for an int s)."""
  h, w = _hw(size)
  if img.shape[:2] == (h, w):
    return img
  return _from_pil(_to_pil(img).resize((w, h), Image.BILINEAR))


def _resize_box(im: Image.Image, size: Size, box: Sequence[float]) -> np.ndarray:
  """Crops `box` = (left, top, right, bottom) out of `im` and resizes it to `size`."""
  h, w = _hw(size)
  left, top, right, bottom = box
  if (right - left, bottom - top) == (w, h) and all(float(v).is_integer() for v in box):
    return _from_pil(im.crop(tuple(int(v) for v in box)))
  return _from_pil(im.resize((w, h), Image.BILINEAR, box=tuple(box)))


def sample_crop_window(height: int, width: int, rng: np.random.Generator,
                       scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Inception-style crop window (top, left, h, w): area fraction in `scale`, aspect w/h in
  `ratio` (log-uniform); 10 attempts, then the largest central crop with aspect in `ratio`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: np.ndarray, size: Size, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style random crop (see `sample_crop_window`) resized to `size`."""
  top, left, h, w = sample_crop_window(img.shape[0], img.shape[1], rng, scale, ratio)
  return _resize_box(_to_pil(img), size, (left, top, left + w, top + h))


def decode_and_random_crop(image_bytes: bytes, size: Size, rng: np.random.Generator,
                           scale: tuple[float, float] = (0.08, 1.0),
                           ratio: tuple[float, float] = (3 / 4, 4 / 3),
                           channels: int = 3) -> np.ndarray:
  """`random_resized_crop(decode(image_bytes), ...)`, faster for large JPEGs.

  Draws the same window from `rng` as `random_resized_crop`, then lets the JPEG decoder
  downscale by 1/2, 1/4 or 1/8 (`Image.draft`) as long as the crop stays at least `size`, so
  the result differs from the slow path only by DCT-domain versus pixel-domain downscaling.
  """
  im = _open(image_bytes, channels)
  width, height = im.size
  top, left, h, w = sample_crop_window(height, width, rng, scale, ratio)
  out_h, out_w = _hw(size)
  box = (left, top, left + w, top + h)
  if im.format == 'JPEG':
    request = (math.ceil(width * out_w / w), math.ceil(height * out_h / h))
    drafted = im.draft('L' if channels == 1 else None, request)
    if drafted is not None and drafted[1][2] != width:  # drafted[1]: the image's box, rescaled
      s = drafted[1][2] / width
      box = (left * s, top * s, (left + w) * s, (top + h) * s)
  return _resize_box(_convert(im, channels), (out_h, out_w), box)


def random_flip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Left-right flip with probability `p`."""
  return img[:, ::-1] if rng.random() < p else img


def pad_random_crop(img: np.ndarray, pad: int, rng: np.random.Generator,
                    mode: str = 'reflect') -> np.ndarray:
  """CIFAR-style: pad H and W by `pad` ('reflect' or 'constant' zeros), random crop back."""
  if pad == 0:
    return img
  h, w = img.shape[:2]
  widths = ((pad, pad), (pad, pad)) + ((0, 0),) * (img.ndim - 2)
  padded = np.pad(img, widths, mode=mode)
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  return padded[top:top + h, left:left + w]


def center_crop_resize(img: np.ndarray, size: Size, crop_fraction: float = 0.875) -> np.ndarray:
  """Eval crop: the central window of `size`'s aspect, `crop_fraction` of the largest such
  window, resized to `size` (a 32x32 image, size 28 and 0.875 give img[2:30, 2:30])."""
  height, width = img.shape[:2]
  out_h, out_w = _hw(size)
  s = crop_fraction * min(height / out_h, width / out_w)
  h = max(1, min(height, int(round(out_h * s))))
  w = max(1, min(width, int(round(out_w * s))))
  top, left = (height - h + 1) // 2, (width - w + 1) // 2
  return resize(img[top:top + h, left:left + w], (out_h, out_w))

