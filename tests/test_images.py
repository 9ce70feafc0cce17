"""Tests for df_agent.images: safe loading, clear errors, EXIF, RGB, hashing, data URIs."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from df_agent.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_data_uri,
    image_hash,
    load_image,
    to_data_uri,
)


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (its pixel data is missing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes(
        "RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3))
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(str(tmp_path))


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(path)
    assert "notes.png" in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        load_image(path)


def test_truncated_png_fails_now(tmp_path):
    data = _png_bytes(_noise(200, 200))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path)
    assert "cut.png" in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_huge_header_is_refused_before_decoding():
    # 7000x7000 is under PIL's own bomb limit: our max_pixels check must catch it, from the header
    # alone (the file has no pixel data, so decoding would fail with a different message).
    with pytest.raises(ImageError, match="too large") as info:
        load_image(_png_header(7000, 7000))
    assert "7000x7000" in str(info.value)
    assert f"{DEFAULT_MAX_PIXELS:,}" in str(info.value)


def test_decompression_bomb_is_an_image_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(50_000, 50_000))
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path)
    assert "2500000000" in str(info.value)  # the size PIL reports
    assert "bomb.png" in str(info.value)


def test_small_max_pixels_on_a_real_image():
    with pytest.raises(ImageError, match=r"100x100 = 10,000 pixels, more than the limit of 5,000"):
        load_image(_png_bytes(_noise(100, 100)), max_pixels=5000)
    assert load_image(_png_bytes(_noise(100, 100)), max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("data:image/png;base64,!!!not base64***", "invalid base64"),
        ("data:image/png,rawbytes", "not base64-encoded"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png;base64,", "no data"),
        ("data:image/png;base64", "no ','"),
    ],
)
def test_bad_data_uri(uri, problem):
    with pytest.raises(ImageError, match=problem):
        decode_data_uri(uri)
    with pytest.raises(ImageError, match=problem):
        load_image(uri)


def test_data_uri_of_non_image_bytes():
    with pytest.raises(ImageError, match="data URI is not an image in a format"):
        load_image("data:image/png;base64,aGVsbG8gd29ybGQ=")


def test_decode_data_uri_rejects_non_uri():
    with pytest.raises(ImageError, match="not a data URI"):
        decode_data_uri("hello")


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "HTTP://example.com/cat.png"])
def test_urls_are_not_loaded(url):
    with pytest.raises(ImageError, match="URLs are not loaded by load_image"):
        load_image(url)


def test_bad_bytes():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"image bytes .* not an image"):
        load_image(b"GIF89a but not really")


def test_unsupported_type():
    with pytest.raises(TypeError, match="int"):
        load_image(42)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)

    loaded = load_image(path)
    assert loaded.size == (20, 40)
    r, _, b = loaded.getpixel((10, 5))  # the left half is now on top
    assert r > 200 and b < 60
    r, _, b = loaded.getpixel((10, 35))
    assert b > 200 and r < 60

    with Image.open(path) as opened:
        as_pil = load_image(opened)
        assert as_pil.size == (20, 40)
        assert opened.size == (40, 20)  # the passed image is not changed


def test_rgba_is_flattened_onto_white():
    image = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    loaded = load_image(image)
    assert loaded.mode == "RGB"
    assert loaded is not image and image.mode == "RGBA"
    assert loaded.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.getpixel((3, 1)) == (255, 255, 255)
    assert all(125 <= v <= 130 for v in loaded.getpixel((1, 0)))


def test_grayscale_and_palette_become_rgb():
    assert load_image(Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)
    palette = Image.new("P", (3, 3), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    assert load_image(palette).getpixel((2, 2)) == (10, 20, 30)


def test_load_from_path_str_pathlike_and_bytes(tmp_path):
    image = _noise()
    path = tmp_path / "noise.png"
    image.save(path)
    expected = image_hash(image)
    assert image_hash(load_image(path)) == expected
    assert image_hash(load_image(str(path))) == expected
    assert image_hash(load_image(path.read_bytes())) == expected


def test_hash_is_stable_across_formats(tmp_path):
    image = _noise()
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "a.bmp")
    from_png = load_image(tmp_path / "a.png")
    from_bmp = load_image(tmp_path / "a.bmp")
    assert image_hash(from_png) == image_hash(from_bmp) == image_hash(image)
    assert len(image_hash(image)) == 64


def test_hash_differs_for_different_pixels_and_shapes():
    image = _noise()
    other = image.copy()
    other.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    assert image_hash(image) != image_hash(other)
    flat = bytes(range(18))
    assert image_hash(Image.frombytes("RGB", (2, 3), flat)) != image_hash(
        Image.frombytes("RGB", (3, 2), flat)
    )


def test_data_uri_round_trip():
    image = _noise()
    uri = to_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    assert decode_data_uri(uri).startswith(b"\x89PNG")
    assert image_hash(load_image(uri)) == image_hash(image)
    jpeg = to_data_uri(Image.new("RGBA", (8, 8), (0, 128, 0, 255)), fmt="JPEG")
    assert jpeg.startswith("data:image/jpeg;base64,")
    assert load_image(jpeg).size == (8, 8)


def _png16(width: int, height: int, rows: list[list[int]], color_type: int) -> bytes:
    """A 16-bit PNG (grayscale: color_type 0, one value a pixel; RGB: 2, three) written by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + struct.pack(f">{len(row)}H", *row) for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_a_16_bit_grayscale_gradient_loads_as_a_gradient():
    width = 256
    row = [round(x * 65535 / (width - 1)) for x in range(width)]
    loaded = load_image(_png16(width, 2, [row, row], color_type=0))
    values = [loaded.getpixel((x, 0))[0] for x in range(width)]
    assert values == pytest.approx(list(range(width)), abs=1)  # scaled, not clipped to white
    assert sum(v == 255 for v in values) <= 2


def test_a_16_bit_rgb_gradient_loads_as_a_gradient():
    width = 64
    row = [v for x in range(width) for v in (x * 1040, 65535 - x * 1040, 32768)]
    loaded = load_image(_png16(width, 1, [row], color_type=2))
    red = [loaded.getpixel((x, 0))[0] for x in range(width)]
    assert red == sorted(red) and red[0] <= 1 and red[-1] >= 250
    assert loaded.getpixel((0, 0))[2] == pytest.approx(128, abs=1)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_16_bit_modes_are_scaled(mode):
    image = Image.new(mode, (3, 1))
    for x, value in enumerate([0, 32896, 65535]):
        image.putpixel((x, 0), value)
    assert [load_image(image).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", [0, 100, 255], [0, 100, 255]),  # 8-bit values: kept
        ("I", [0, 32896, 65535], [0, 128, 255]),  # 16-bit values: scaled
        ("I", [-1000, 0, 1000], [0, 128, 255]),  # any other range: stretched
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # fractions
        ("F", [0.0, 128.0, 255.0], [0, 128, 255]),
        ("F", [-2.0, 0.0, 2.0], [0, 128, 255]),
        ("F", [float("nan"), 0.5, 1.0], [0, 128, 255]),
    ],
)
def test_integer_and_float_modes_are_scaled_by_their_range(mode, values, expected):
    image = Image.new(mode, (3, 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    assert [load_image(image).getpixel((x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize(
    ("mode", "value", "rgb"),
    [
        ("1", 1, (255, 255, 255)),
        ("L", 7, (7, 7, 7)),
        ("LA", (7, 255), (7, 7, 7)),
        ("La", (7, 255), (7, 7, 7)),
        ("PA", (0, 255), (0, 0, 0)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # transparent: white
        ("RGBa", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBX", (10, 20, 30, 0), (10, 20, 30)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("LAB", (255, 128, 128), (254, 255, 254)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
    ],
)
def test_every_mode_pil_opens_loads_as_rgb(mode, value, rgb):
    loaded = load_image(Image.new(mode, (2, 2), value))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == pytest.approx(rgb, abs=1)


def test_an_unsupported_mode_is_refused_by_name():
    image = Image.new("RGB", (2, 2))
    image._mode = "BGR;24"  # Pillow 13 opens no mode outside SUPPORTED_MODES: an older one, forged
    with pytest.raises(ImageError, match=r"image mode 'BGR;24' is not supported"):
        load_image(image)


def test_dev_zero_is_refused_as_a_device():
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero on this system")
    with pytest.raises(ImageError, match="is a character device, not a regular image file"):
        load_image("/dev/zero")


def test_a_named_pipe_is_refused_without_being_read(tmp_path):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with pytest.raises(ImageError, match="is a named pipe"):
        load_image(pipe)  # opening it would block forever


def test_downscale_shrinks_instead_of_refusing(tmp_path):
    image = _noise(400, 300)
    assert load_image(image, max_pixels=30_000, downscale=True).size == (200, 150)
    image.save(tmp_path / "big.jpg", quality=90)
    shrunk = load_image(tmp_path / "big.jpg", max_pixels=1_000, downscale=True)
    assert shrunk.size == (36, 27) and shrunk.width * shrunk.height <= 1_000
    assert load_image(_png_bytes(image), max_pixels=120_000, downscale=True).size == (400, 300)
    with pytest.raises(ImageError, match="downscale=True shrinks it instead"):
        load_image(image, max_pixels=30_000)


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-5, ValueError), (1.5, TypeError), ("9", TypeError)]
)
def test_max_pixels_must_be_a_positive_integer(value, error):
    with pytest.raises(error, match="max_pixels"):
        load_image(_noise(4, 4), max_pixels=value)
