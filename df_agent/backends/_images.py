"""Images on the wire: PNG base64, encoded once per image object while it lives.

The steps of one question send the same picture several times (the macro answer, the box request,
the micro answer); encoding it once saves most of a remote backend's client-side time.
"""

from __future__ import annotations

import base64
import io
import threading
import weakref
from collections import OrderedDict

from PIL import Image

_CACHE_SIZE = 64
_cache: OrderedDict[int, tuple[weakref.ref, str]] = OrderedDict()
_lock = threading.Lock()


def png_base64(image: Image.Image) -> str:
    """The image as base64 PNG (lossless, fast compression), from a cache keyed by the live object."""
    key = id(image)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is image:
            _cache.move_to_end(key)
            return hit[1]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    with _lock:
        _cache[key] = (weakref.ref(image), encoded)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return encoded


def png_data_uri(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URI (see `png_base64`)."""
    return "data:image/png;base64," + png_base64(image)


__all__ = ["png_base64", "png_data_uri"]
