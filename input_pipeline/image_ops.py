"""Numpy/Pillow image transforms on uint8 [H, W, C] arrays.

Random ops take a `np.random.Generator` (what grain's `random_map` passes), so they are
deterministic given its state. Resizing is Pillow bilinear (antialiased when downscaling).

Decoding gives every image Pillow opens its 8-bit values, upright (see `to_8bit`); images
whose values have no 8-bit meaning raise UnsupportedImageError, which `launch.prepare_data`
reports by path.
"""
import io
import math
from typing import Sequence, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

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


class UnsupportedImageError(ValueError):
  """An image whose pixel values have no defined 8-bit meaning (Pillow modes 'I', 'F')."""


_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')   # unsigned 16-bit gray, any byte order
_EIGHT_BIT = ('L', 'LA', 'RGB', 'RGBA')


def _open(image_bytes: bytes, channels: int) -> Image.Image:
  if channels not in _MODES:
    raise ValueError(f'channels must be one of {sorted(_MODES)}, got {channels}.')
  return Image.open(io.BytesIO(image_bytes))


def _orientation(im: Image.Image) -> int:
  return int(im.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def to_8bit(im: Image.Image) -> Image.Image:
  """`im` as 'L', 'LA', 'RGB' or 'RGBA' with the 8-bit values it stands for.

  16-bit samples keep their high byte, v >> 8 (libpng's png_set_strip_16, not
  png_set_scale_16; e.g. 255 -> 0, 32896 -> 128, 65535 -> 255): what Pillow itself does when
  it opens 16-bit RGB, RGBA and gray+alpha PNGs, and here also for 16-bit gray ('I;16*', which
  Pillow's own conversion clips to 255 above 255) and 16-bit PGM (mode 'I' scaled to
  0..65535 by Pillow). '1' -> L (0/255); P, PA (their transparency too), CMYK (R = 255 (1 - C)
  (1 - K), Adobe-inverted JPEGs read by Pillow), YCbCr, LAB, HSV, ... -> RGB, or RGBA when
  they carry alpha. Raises UnsupportedImageError for 32-bit integer ('I') and float ('F')
  images, which have no defined 8-bit range.
  """
  mode = im.mode
  if mode in _EIGHT_BIT:
    return im
  if mode in _SIXTEEN_BIT or (mode == 'I' and im.format == 'PPM'):
    return Image.fromarray(high_byte(np.asarray(im)), 'L')
  if mode in ('I', 'F', 'I;16S'):
    kind = {'I': '32-bit integer', 'F': '32-bit float', 'I;16S': 'signed 16-bit'}[mode]
    raise UnsupportedImageError(
        f'{im.format or "image"} of mode {mode!r} ({kind} pixels) has no defined 8-bit range; '
        'convert it to an 8- or 16-bit image (e.g. PNG) first')
  if mode == '1':
    return im.convert('L')
  alpha = 'A' in mode or 'a' in mode or 'transparency' in im.info
  try:
    return im.convert('RGBA' if alpha else 'RGB')
  except ValueError as e:
    raise UnsupportedImageError(f'{im.format or "image"} of mode {mode!r}: {e}') from e


def high_byte(values: np.ndarray) -> np.ndarray:
  """16-bit samples (any integer dtype, 0..65535) to uint8 v >> 8, libpng's strip-16."""
  return (np.asarray(values).astype(np.uint32) >> 8).astype(np.uint8)


def _upright_8bit(im: Image.Image) -> Image.Image:
  """Decodes `im` fully, applies its EXIF orientation and `to_8bit`."""
  ImageOps.exif_transpose(im, in_place=True)
  return to_8bit(im)


def _convert(im: Image.Image, channels: int) -> Image.Image:
  """An 8-bit L/LA/RGB/RGBA image to `channels`: gray is luma (ITU-R 601-2, as Pillow), alpha
  is dropped for 1 and 3 channels (not composited, as TF's decode_png) and 255 when absent."""
  mode = _MODES[channels]
  return im if im.mode == mode else im.convert(mode)


def decode(image_bytes: bytes, channels: int = 3) -> np.ndarray:
  """Decodes JPEG/PNG/... bytes to uint8 [H, W, channels] (channels 1, 3 or 4), upright (EXIF
  orientation applied) and with the 8-bit values of `to_8bit`. Raises UnsupportedImageError
  for images without an 8-bit meaning, ValueError for other channel counts."""
  return _from_pil(_convert(_upright_8bit(_open(image_bytes, channels)), channels))


def pixel_sums(image_bytes: bytes) -> tuple[str, tuple[int, int, int], dict]:
  """`inspect`, plus the image's pixel sums as `decode` makes them for 1 and 3 channels:
  {c: (sum [c], sum of squares [c], pixels)} of values in [0, 1] (dataset statistics)."""
  with Image.open(io.BytesIO(image_bytes)) as im:
    fmt = im.format or '?'
    upright = _upright_8bit(im)
    sums = {}
    for c in (1, 3):
      x = _from_pil(_convert(upright, c)).reshape(-1, c).astype(np.float64) / 255.0
      sums[c] = (x.sum(0), (x * x).sum(0), len(x))
    return fmt, (upright.size[1], upright.size[0], len(upright.getbands())), sums


def inspect(image_bytes: bytes) -> tuple[str, tuple[int, int, int]]:
  """(format, (h, w, c)) of the image `decode` makes of these bytes (c: 1 gray, 2 gray+alpha,
  3, 4), decoding it fully; raises what `decode` raises, or Pillow's error."""
  with Image.open(io.BytesIO(image_bytes)) as im:
    fmt = im.format or '?'
    upright = _upright_8bit(im)
    return fmt, (upright.size[1], upright.size[0], len(upright.getbands()))


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
  Other formats and EXIF-rotated JPEGs take the slow path (`decode`, then the crop).
  """
  im = _open(image_bytes, channels)
  if im.format != 'JPEG' or _orientation(im) != 1:  # nothing to gain, or rotated: decode all
    return random_resized_crop(decode(image_bytes, channels), size, rng, scale, ratio)
  width, height = im.size
  top, left, h, w = sample_crop_window(height, width, rng, scale, ratio)
  out_h, out_w = _hw(size)
  box = (left, top, left + w, top + h)
  request = (math.ceil(width * out_w / w), math.ceil(height * out_h / h))
  drafted = im.draft('L' if channels == 1 else None, request)
  if drafted is not None and drafted[1][2] != width:  # drafted[1]: the image's box, rescaled
    s = drafted[1][2] / width
    box = (left * s, top * s, (left + w) * s, (top + h) * s)
  return _resize_box(_convert(to_8bit(im), channels), (out_h, out_w), box)


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

