"""Every image mode Pillow opens decodes to the right 8-bit values, upright, or is reported by
path when the dataset is prepared (issue 15, item 4). Images are written here; the expected
values are numpy oracles: 16-bit samples keep their high byte (v >> 8, libpng's strip-16),
gray is ITU-R 601-2 luma, alpha is dropped for 1 and 3 channels, EXIF orientations are numpy
flips / rotations."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from input_pipeline import image_ops, records
from launch import prepare_data

# 16-bit values where strip-16 (v >> 8) and libpng's scale-16 (round(v * 255 / 65535)) differ:
# 255 -> 0 vs 1, 511 -> 1 vs 2; 32896 -> 128 both (the issue's example).
SIXTEEN = np.array([0, 255, 511, 32896, 33023, 65279, 65535], np.uint16)


def _luma(rgb):
  rgb = np.asarray(rgb, np.float64)
  return np.floor(rgb @ [0.299, 0.587, 0.114] + 0.5).astype(np.uint8)


def _png_chunk(kind, data):
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))


def _png16(samples, colour_type):
  """A 16-bit PNG written byte by byte: samples [H, W, C] (C = 1, 2 (gray+alpha), 3, 4)."""
  h, w = samples.shape[:2]
  rows = b''.join(b'\0' + samples[y].astype('>u2').tobytes() for y in range(h))
  return (b'\x89PNG\r\n\x1a\n' +
          _png_chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour_type, 0, 0, 0)) +
          _png_chunk(b'IDAT', zlib.compress(rows)) + _png_chunk(b'IEND', b''))


def _save(im, fmt, **kw):
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _decode_all(data):
  return {c: image_ops.decode(data, channels=c) for c in (1, 3, 4)}


def _check_gray(data, gray, alpha=None):
  """decode(data) for 1, 3, 4 channels against 8-bit gray [H, W] (and alpha)."""
  out = _decode_all(data)
  np.testing.assert_array_equal(out[1][..., 0], gray)
  np.testing.assert_array_equal(out[3], np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(out[4][..., :3], np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(out[4][..., 3], 255 if alpha is None else alpha)


def _check_rgb(data, rgb, alpha=None):
  out = _decode_all(data)
  np.testing.assert_array_equal(out[3], rgb)
  np.testing.assert_array_equal(out[1][..., 0], _luma(rgb))
  np.testing.assert_array_equal(out[4][..., :3], rgb)
  np.testing.assert_array_equal(out[4][..., 3], 255 if alpha is None else alpha)


# --- 16-bit ----------------------------------------------------------------------------------

def test_issue_16_bit_gray_png_is_not_white():
  data = _png16(np.array([[[0], [32896], [65535]]], np.uint16), 0)
  assert Image.open(io.BytesIO(data)).mode == 'I;16'
  np.testing.assert_array_equal(image_ops.decode(data, channels=1)[0, :, 0], [0, 128, 255])


def test_16_bit_gray_in_every_byte_order_and_pgm():
  gray = (SIXTEEN >> 8).astype(np.uint8)[None]
  _check_gray(_png16(SIXTEEN[None, :, None], 0), gray)
  _check_gray(_save(Image.fromarray(SIXTEEN[None]), 'PNG'), gray)            # Pillow's I;16
  big = Image.frombytes('I;16B', (len(SIXTEEN), 1), SIXTEEN.astype('>u2').tobytes())
  _check_gray(_save(big, 'TIFF'), gray)
  pgm = b'P5\n%d 1\n65535\n' % len(SIXTEEN) + SIXTEEN.astype('>u2').tobytes()
  assert Image.open(io.BytesIO(pgm)).mode == 'I'                              # Pillow: 'I'
  _check_gray(pgm, gray)


def test_16_bit_rgb_rgba_and_gray_alpha_pngs():
  rgb16 = np.stack([SIXTEEN, SIXTEEN[::-1], np.roll(SIXTEEN, 2)], -1)[None]  # [1, 7, 3]
  _check_rgb(_png16(rgb16, 2), (rgb16 >> 8).astype(np.uint8))
  alpha16 = np.roll(SIXTEEN, 3)[None]
  rgba16 = np.concatenate([rgb16, alpha16[..., None]], -1)
  _check_rgb(_png16(rgba16, 6), (rgb16 >> 8).astype(np.uint8), (alpha16 >> 8).astype(np.uint8))
  la16 = np.stack([SIXTEEN[None], alpha16], -1)
  _check_gray(_png16(la16, 4), (SIXTEEN >> 8).astype(np.uint8)[None],
              (alpha16 >> 8).astype(np.uint8))


def test_decoded_16_bit_arrays_keep_their_high_byte():
  from input_pipeline.pipeline import preprocess
  image = np.stack([SIXTEEN] * 3, -1)[None]                                   # uint16 [1, 7, 3]
  out = preprocess({'image': image, 'label': 0}, None)
  np.testing.assert_array_equal(out['image'], (image >> 8).astype(np.uint8))


# --- 8-bit modes with alpha, palettes, CMYK, bilevel --------------------------------------------

def test_gray_alpha_rgba_and_bilevel():
  rng = np.random.default_rng(0)
  gray, alpha = rng.integers(0, 256, (2, 3, 5), dtype=np.uint8)
  _check_gray(_save(Image.fromarray(np.stack([gray, alpha], -1), 'LA'), 'PNG'), gray, alpha)
  rgb = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
  _check_rgb(_save(Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1)), 'PNG'), rgb,
             alpha)
  bits = rng.integers(0, 2, (3, 5)).astype(bool)
  _check_gray(_save(Image.fromarray(bits), 'PNG'), np.where(bits, 255, 0).astype(np.uint8))


def test_palette_with_transparency_and_palette_alpha():
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 30, 200]], np.uint8)
  index = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
  p = Image.fromarray(index, 'P')
  p.putpalette(colours.ravel().tolist())
  data = _save(p, 'PNG', transparency=1)                                      # index 1 clear
  assert Image.open(io.BytesIO(data)).mode == 'P'
  _check_rgb(data, colours[index], np.where(index == 1, 0, 255))
  pa = Image.new('PA', (4, 2))                                                # PNG cannot hold
  pa.putpalette(colours.ravel().tolist())                                     # PA: the image
  alpha = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], np.uint8)           # object itself
  pa.putdata([(int(i), int(a)) for i, a in zip(index.ravel(), alpha.ravel())])
  rgba = np.asarray(image_ops.to_8bit(pa))
  np.testing.assert_array_equal(rgba[..., :3], colours[index])
  np.testing.assert_array_equal(rgba[..., 3], alpha)


def test_cmyk_tiff_and_jpeg():
  cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 20, 60],
                    [10, 200, 90, 30]]], np.uint8)
  k = cmyk[..., 3:].astype(np.float64)
  rgb = np.floor((255 - cmyk[..., :3]) * (255 - k) / 255 + 0.5).astype(np.uint8)
  _check_rgb(_save(Image.fromarray(cmyk, 'CMYK'), 'TIFF'), rgb)
  flat = np.repeat(np.repeat(cmyk, 8, 0), 8, 1)                               # JPEG: flat blocks
  jpeg = image_ops.decode(_save(Image.fromarray(flat, 'CMYK'), 'JPEG', quality=100))
  expected = np.repeat(np.repeat(rgb, 8, 0), 8, 1)
  assert np.abs(jpeg.astype(int) - expected).max() <= 3


def test_32_bit_integer_and_float_images_are_refused():
  for image in (Image.fromarray(np.array([[0, 100, 70000]], np.int32), 'I'),
                Image.fromarray(np.array([[0, 0.5, 300.0]], np.float32), 'F')):
    with pytest.raises(image_ops.UnsupportedImageError, match='no defined 8-bit range'):
      image_ops.decode(_save(image, 'TIFF'))


# --- EXIF orientation ----------------------------------------------------------------------

_ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
           4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
           6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
           8: lambda a: np.rot90(a, 1)}


def _with_orientation(image, fmt, orientation, **kw):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _save(image, fmt, exif=exif.tobytes(), **kw)


def test_exif_orientation_is_applied():
  stored = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
  for orientation, upright in _ORIENT.items():
    data = _with_orientation(Image.fromarray(stored), 'PNG', orientation)
    np.testing.assert_array_equal(image_ops.decode(data), upright(stored), str(orientation))
    h, w = upright(stored).shape[:2]
    assert image_ops.inspect(data) == ('PNG', (h, w, 3))


def test_exif_rotated_jpeg_decodes_and_crops_upright():
  y, x = np.mgrid[0:48, 0:80]
  stored = np.stack([x * 3, y * 5, (x + y) % 256], -1).astype(np.uint8)     # 48 x 80, smooth
  data = _with_orientation(Image.fromarray(stored), 'JPEG', 6, quality=95)
  plain = np.asarray(Image.open(io.BytesIO(data)))                            # as stored
  decoded = image_ops.decode(data)
  assert decoded.shape == (80, 48, 3)
  np.testing.assert_array_equal(decoded, np.rot90(plain, -1))
  crop = image_ops.decode_and_random_crop(data, 16, np.random.default_rng(3))
  np.testing.assert_array_equal(
      crop, image_ops.random_resized_crop(np.rot90(plain, -1), 16, np.random.default_rng(3)))


# --- at preparation time ---------------------------------------------------------------------

def test_prepare_keeps_decodable_modes_and_reports_the_rest_by_path(tmp_path, capsys):
  root = tmp_path / 'in' / 'train' / 'a'
  root.mkdir(parents=True)
  (root / 'gray16.png').write_bytes(_png16(SIXTEEN[None, :, None], 0))
  (root / 'floats.tif').write_bytes(
      _save(Image.fromarray(np.array([[0.0, 0.5]], np.float32), 'F'), 'TIFF'))
  (root / 'ints.tif').write_bytes(
      _save(Image.fromarray(np.array([[0, 70000]], np.int32), 'I'), 'TIFF'))
  out = tmp_path / 'out'
  meta = prepare_data.prepare('folder', str(out), input_dir=str(tmp_path / 'in'), verbose=False)
  skipped = {s['source']: s['error'] for s in meta['skipped']}
  assert set(skipped) == {str(root / 'floats.tif'), str(root / 'ints.tif')}
  assert all('no defined 8-bit range' in e for e in skipped.values())
  assert 'floats.tif' in capsys.readouterr().err
  assert meta['image_size'] == [1, len(SIXTEEN), 1]
  from array_record.python.array_record_module import ArrayRecordReader
  [path] = records.split_paths(str(out), 'train')
  reader = ArrayRecordReader(path)
  [record] = reader.read_all()
  reader.close()
  _, image = records.decode_record(record)
  np.testing.assert_array_equal(image_ops.decode(image, channels=1)[0, :, 0], SIXTEEN >> 8)
