"""Tests for df_agent.images: safe loading, clear errors, EXIF, RGB, hashing, data URIs."""

from __future__ import annotations

import io
import random
import struct
import zlib

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
