"""Images: load one from a path, bytes, a data URI or a PIL image, safely; hash it; encode it.

`load_image` is the one door images come in by: it checks the pixel count before decoding (or,
asked to, shrinks the image to fit), decodes fully (a truncated file fails here, not later),
applies the EXIF orientation and returns a new 8-bit RGB image. High-bit-depth pixels (16-bit,
32-bit integer, float) are scaled to 8 bits, never clipped. Every failure is an `ImageError` that
names the input and what was wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import stat
import weakref
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000

# Errors PIL raises while decoding a corrupt or truncated file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError)
_ORIENTATION = 0x0112  # the EXIF Orientation tag
# Modes PIL converts to RGB correctly as they are; the high-bit-depth ones are scaled first.
_DIRECT = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
_HIGH_DEPTH = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
SUPPORTED_MODES = _DIRECT | _HIGH_DEPTH


class ImageError(ValueError):
    """An input could not be loaded as an image; the message says which input and why."""


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a base64 image data URI (``data:image/png;base64,...``).

    Args:
        uri: The data URI.

    Returns:
        The decoded bytes.

    Raises:
        ImageError: If `uri` is not a base64 ``data:image/...`` URI or its payload is not valid base64.
    """
    if not isinstance(uri, str) or not uri.startswith("data:"):
        raise ImageError(f"not a data URI (must start with 'data:'): {_short(repr(uri))}")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageError(f"malformed data URI, no ',' after the header: {_short(uri)}")
    media_type, *params = header.split(";")
    if not media_type.lower().startswith("image/"):
        raise ImageError(f"data URI is not an image (media type {media_type or 'missing'!r})")
    if "base64" not in (p.strip().lower() for p in params):
        raise ImageError(f"data URI is not base64-encoded (header {header!r})")
    payload = "".join(payload.split())
    if not payload:
        raise ImageError("data URI has no data after the header")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URI has an invalid base64 payload: {exc}") from None


def to_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    """Encode an image as a base64 data URI.

    Args:
        image: The image.
        fmt: A PIL format name (``"PNG"``, ``"JPEG"``, ...).

    Returns:
        ``data:<media type>;base64,<payload>``.
    """
    fmt = fmt.upper()
    if fmt in ("JPEG", "JPG") and image.mode not in ("RGB", "L"):
        image = _to_rgb(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "JPG" else fmt)
    media_type = Image.MIME.get("JPEG" if fmt == "JPG" else fmt, f"image/{fmt.lower()}")
    return f"data:{media_type};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def image_hash(image: Image.Image) -> str:
    """A content hash: the same picture gives the same hash whatever file format it came from.

    Args:
        image: The image; it is hashed as RGB (alpha flattened onto white, as `load_image` does).

    Returns:
        The sha256 hex digest of a ``RGB <width>x<height>`` header and the RGB pixel bytes.
    """
    rgb = _to_rgb(image)
    digest = hashlib.sha256(f"{rgb.mode} {rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image; transparent pixels are flattened onto white, deep pixels scaled to 8 bits."""
    if image.mode not in SUPPORTED_MODES:
        raise ImageError(
            f"image mode {image.mode!r} is not supported (supported: {', '.join(sorted(SUPPORTED_MODES))})"
        )
    if image.mode in _HIGH_DEPTH:
        return _to_8bit(image).convert("RGB")
    if image.mode == "La":  # premultiplied alpha, which PIL converts to nothing: undo it here
        luma, alpha = np.moveaxis(np.asarray(image).astype(np.float64), -1, 0)
        luma = np.where(alpha > 0, np.minimum(luma * 255.0 / np.maximum(alpha, 1), 255), 0)
        image = Image.fromarray(np.stack([np.rint(luma), alpha], axis=-1).astype(np.uint8), mode="LA")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    background.alpha_composite(image.convert("RGBA"))
    return background.convert("RGB")


# The images `load_image` returned, by id: given to it again, one comes back as it is (no second decode).
_LOADED: weakref.WeakValueDictionary[int, Image.Image] = weakref.WeakValueDictionary()


def _to_8bit(image: Image.Image) -> Image.Image:
    """An "L" image of a 16-bit, 32-bit integer or float one, its values scaled, never clipped.

    16-bit modes map 0..65535 onto 0..255. Modes "I" and "F" are read by their values: within
    0..255 they are kept, within 0..65535 scaled as 16-bit ("F" within 0..1 as fractions); any
    other range is stretched from its minimum to its maximum. Non-finite values become 0.
    """
    values = np.asarray(image).astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    elif low >= 0 and high <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _fit(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most `max_pixels` pixels."""
    width, height = size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _decode(image: Image.Image, name: str, max_pixels: int, downscale: bool = False) -> Image.Image:
    """Check the size (or shrink to fit), decode fully, orient and convert; returns a new image."""
    width, height = image.size
    target = None
    if width * height > max_pixels:
        if not downscale:
            raise ImageError(
                f"{name} is too large: {width}x{height} = {width * height:,} pixels, "
                f"more than the limit of {max_pixels:,} (max_pixels; downscale=True shrinks it instead)"
            )
        target = _fit((width, height), max_pixels)
    try:
        if target is not None and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
            image.draft(image.mode, target)  # JPEG decodes at a reduced scale; other formats ignore it
        image.load()
        if target is not None:
            image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        if image.getexif().get(_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)  # a new image; the input is left as it was
        loaded = _to_rgb(image)
        _LOADED[id(loaded)] = loaded
        return loaded
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name} is too large to decode: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{name} could not be decoded (truncated or corrupt?): {exc}") from None


def _open(data: bytes | Path, name: str, max_pixels: int, downscale: bool) -> Image.Image:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as image:
            return _decode(image, name, max_pixels, downscale)
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image in a format PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name} is too large (limit {max_pixels:,} pixels): {exc}") from None
    except ImageError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{name} could not be read as an image: {exc}") from None


def load_image(
    source: str | os.PathLike | bytes | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    downscale: bool = False,
) -> Image.Image:
    """Load an image safely, as a new 8-bit RGB image with its EXIF orientation applied.

    The pixel count is checked against `max_pixels` from the header, before any pixel is decoded;
    the whole image is then decoded, so a truncated file fails here. PIL's own decompression-bomb
    limit (``Image.MAX_IMAGE_PIXELS``) still applies on top of `max_pixels`. URLs are not fetched.
    Every mode in `SUPPORTED_MODES` loads: 16-bit, 32-bit integer and float pixels are scaled to
    8 bits (never clipped), alpha is flattened onto white; any other mode is refused by name.

    Args:
        source: A filesystem path, a base64 ``data:image/...`` URI, encoded image bytes, or a PIL
            image (which is never modified; one this function returned comes back as it is).
        max_pixels: The largest width * height accepted (default `DEFAULT_MAX_PIXELS`).
        downscale: Shrink a larger image to fit `max_pixels` (same aspect ratio, Lanczos)
            instead of refusing it.

    Returns:
        A new, fully loaded RGB image; transparency is flattened onto white.

    Raises:
        ImageError: If the source is missing, a directory or another non-regular file, empty,
            not an image, truncated or corrupt, too large, in an unsupported mode, an http(s)
            URL or a malformed data URI.
        TypeError: If `source` is none of the accepted types, or `max_pixels` not an integer.
        ValueError: If `max_pixels` is below 1.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int):
        raise TypeError(f"max_pixels must be an integer, not {type(max_pixels).__name__}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, not {max_pixels}")
    if isinstance(source, Image.Image):
        if _LOADED.get(id(source)) is source and source.width * source.height <= max_pixels:
            return source  # loaded by this function already (e.g. by the tool registry)
        name = f"PIL image ({source.mode} {source.width}x{source.height})"
        return _decode(source, name, max_pixels, downscale)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("image bytes are empty (0 bytes)")
        return _open(data, f"image bytes ({len(data):,} bytes)", max_pixels, downscale)
    if isinstance(source, str) and source.startswith("data:"):
        return _open(decode_data_uri(source), "image from data URI", max_pixels, downscale)
    if isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        raise ImageError(f"URLs are not loaded by load_image; download the image first: {_short(source)}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load an image from {type(source).__name__}")
    path = Path(source)
    name = f"image file {str(path)!r}"
    try:
        missing = not path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise ImageError(f"{name} cannot be read: {exc}") from None
    if missing:
        raise ImageError(f"{name} not found")
    if path.is_dir():
        raise ImageError(f"{name} is a directory, not an image file")
    try:
        info = path.stat()
    except OSError as exc:
        raise ImageError(f"{name} cannot be read: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{name} is {_kind(info.st_mode)}, not a regular image file, so it was not read")
    if info.st_size == 0:
        raise ImageError(f"{name} is empty (0 bytes)")
    return _open(path, name, max_pixels, downscale)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, words in [
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ]:
        if test(mode):
            return words
    return "not a regular file"


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_MODES",
    "ImageError",
    "decode_data_uri",
    "image_hash",
    "load_image",
    "to_data_uri",
]
