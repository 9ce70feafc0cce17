"""Images an agent can name: ids for registered images and crops, and safe resolution of references.

Planners pass images as strings. `ImageRegistry.resolve` turns such a reference into an image, in this
order: an id the registry holds (images the host registered, crops made by a zoom, images resolved
before), a base64 ``data:image/...`` URI, an http(s) URL (only when the host enables URLs), or a file
path under one of the host's allowed roots (none by default). Paths are resolved with symlinks and
``..`` followed *before* the containment check, and the file read is the resolved one, so nothing
outside the roots is ever opened. Anything else raises `ImageReferenceError` with a message a planner
can act on. The module knows nothing of LangChain or MCP: both adapters share it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image

from df_agent.agents.errors import ImageReferenceError
from df_agent.boxes import Box
from df_agent.images import DEFAULT_MAX_PIXELS, ImageError, decode_data_uri, image_hash, load_image

if TYPE_CHECKING:
    import httpx

Source = Literal["host", "data_uri", "file", "url", "crop"]
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_CACHED_BYTES = 512 * 1024 * 1024
_REMEMBERED_EVICTIONS = 4096
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SHOWN_IDS = 10


@dataclass(frozen=True)
class RegisteredImage:
    """An image the registry holds, under its id.

    Attributes:
        id: The id planners use to refer to it.
        image: The decoded RGB image.
        hash: Its content hash (`df_agent.images.image_hash`).
        source: Where it came from: "host", "data_uri", "file", "url" or "crop".
        parent_hash: For a crop: the content hash of the image it was cut from.
        box: For a crop: the cropped region in the parent image's pixels.
        box_text: For a crop: the box as the model writes it (its own reply, or the planner's box
            written in the model's convention), which the micro step continues from.
    """

    id: str
    image: Image.Image
    hash: str
    source: Source
    parent_hash: str | None = None
    box: Box | None = None
    box_text: str | None = None


class ImageRegistry:
    """Holds images under ids and resolves the image references planners pass.

    Images the host registers are kept until replaced; images resolved from data URIs, files and URLs,
    and crops, are cached under ids too (so a planner can refer to them again), the least recently
    used ones dropped beyond `max_cached` entries or `max_cached_bytes` of decoded pixels (the newest
    entry is always kept). An id dropped so is remembered: asking for it again says it was evicted.
    Safe to share between threads.

    Args:
        allowed_roots: Folders whose files planners may name by path (none by default: no paths).
            Each must exist; symlinks in them are resolved.
        allow_urls: Fetch http(s) URLs (off by default).
        http_client: The `httpx.Client` used for URLs (default: a new one per fetch).
        url_timeout: Seconds allowed for each network operation of a URL fetch.
        max_bytes: The largest file, URL body or data URI payload accepted, in bytes.
        max_pixels: The largest width * height accepted.
        max_cached: How many resolved images and crops to keep.
        max_cached_bytes: How many bytes of decoded pixels (width * height * bands) the resolved
            images and crops may hold together; host images do not count.
    """

    def __init__(
        self,
        allowed_roots: Iterable[str | os.PathLike] = (),
        *,
        allow_urls: bool = False,
        http_client: httpx.Client | None = None,
        url_timeout: float = 10.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_cached: int = 64,
        max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES,
    ) -> None:
        roots = []
        for root in allowed_roots:
            real = Path(os.path.realpath(root))
            if not real.is_dir():
                raise ValueError(f"allowed root {str(root)!r} is not an existing folder")
            roots.append(real)
        if min(max_bytes, max_pixels, max_cached, max_cached_bytes) < 1 or url_timeout <= 0:
            raise ValueError(
                "max_bytes, max_pixels, max_cached, max_cached_bytes and url_timeout must be positive"
            )
        self.allowed_roots: tuple[Path, ...] = tuple(roots)
        self.allow_urls = allow_urls
        self.url_timeout = url_timeout
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_cached = max_cached
        self.max_cached_bytes = max_cached_bytes
        self._http_client = http_client
        self._pinned: dict[str, RegisteredImage] = {}
        self._cached: OrderedDict[str, RegisteredImage] = OrderedDict()
        self._cached_bytes = 0
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()

    # -- holding images ------------------------------------------------------------------------

    def register(self, image: Image.Image | bytes | str | os.PathLike, image_id: str | None = None) -> str:
        """Register an image from the host application (trusted: any path is read) and return its id.

        Args:
            image: A PIL image, encoded bytes, a data URI or a file path.
            image_id: The id to give it (letters, digits, ``_ . -``; at most 64 characters);
                default ``img-`` and the start of its content hash. An existing id is replaced.

        Raises:
            ValueError: If `image_id` is malformed.
            df_agent.images.ImageError: If `image` cannot be loaded.
        """
        if image_id is not None and not _ID.match(image_id):
            raise ValueError(
                f"image id {image_id!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                "letter or digit"
            )
        picture = load_image(image, max_pixels=self.max_pixels)
        digest = image_hash(picture)
        entry = RegisteredImage(
            id=image_id or f"img-{digest[:12]}", image=picture, hash=digest, source="host"
        )
        with self._lock:
            dropped = self._cached.pop(entry.id, None)
            if dropped is not None:
                self._cached_bytes -= decoded_bytes(dropped.image)
            self._evicted.pop(entry.id, None)
            self._pinned[entry.id] = entry
        return entry.id

    def add_crop(
        self, crop: Image.Image, *, parent: RegisteredImage, box: Box, box_text: str
    ) -> RegisteredImage:
        """Keep a crop of `parent` under a new id and return its entry.

        Args:
            crop: The cropped image.
            parent: The image it was cut from.
            box: The cropped region in the parent's pixels.
            box_text: The box as the model writes it (see `RegisteredImage.box_text`).
        """
        digest = image_hash(crop)
        key = hashlib.sha256(f"{parent.hash}\n{box.as_tuple()}\n{box_text}".encode()).hexdigest()
        entry = RegisteredImage(
            id=f"crop-{key[:12]}", image=crop, hash=digest, source="crop",
            parent_hash=parent.hash, box=box, box_text=box_text,
        )  # fmt: skip
        self._cache(entry)
        return entry

    def get(self, image_id: str) -> RegisteredImage:
        """The entry under `image_id`.

        Raises:
            ImageReferenceError: If no image has that id, or the one it had was evicted from the cache.
        """
        with self._lock:
            entry = self._pinned.get(image_id) or self._cached.get(image_id)
            if entry is not None and image_id in self._cached:
                self._cached.move_to_end(image_id)
            evicted = entry is None and image_id in self._evicted
        if evicted:
            raise self._evicted_error(image_id)
        if entry is None:
            raise ImageReferenceError(f"unknown image id {image_id!r}. {self._known_ids()}")
        return entry

    def id_for_hash(self, digest: str) -> str | None:
        """The id of a whole image (not a crop) held with content hash `digest`, host images first."""
        with self._lock:
            for entry in (*self._pinned.values(), *self._cached.values()):
                if entry.hash == digest and entry.source != "crop":
                    return entry.id
        return None

    def ids(self) -> list[str]:
        """Every id held: the host's images first, then cached ones, most recent last."""
        with self._lock:
            return [*self._pinned, *self._cached]

    def __contains__(self, image_id: object) -> bool:
        with self._lock:
            return image_id in self._pinned or image_id in self._cached

    def __len__(self) -> int:
        with self._lock:
            return len(self._pinned) + len(self._cached)

    def cached_bytes(self) -> int:
        """The decoded bytes the cached (not host) images and crops hold together."""
        with self._lock:
            return self._cached_bytes

    def _cache(self, entry: RegisteredImage) -> RegisteredImage:
        with self._lock:
            if entry.id in self._pinned:
                return self._pinned[entry.id]
            held = self._cached.pop(entry.id, None)
            if held is not None:
                self._cached_bytes -= decoded_bytes(held.image)
            self._cached[entry.id] = entry
            self._cached_bytes += decoded_bytes(entry.image)
            self._evicted.pop(entry.id, None)
            while len(self._cached) > 1 and (
                len(self._cached) > self.max_cached or self._cached_bytes > self.max_cached_bytes
            ):
                dropped_id, dropped = self._cached.popitem(last=False)
                self._cached_bytes -= decoded_bytes(dropped.image)
                self._evicted[dropped_id] = None
                if len(self._evicted) > _REMEMBERED_EVICTIONS:
                    self._evicted.popitem(last=False)
        return entry

    def _evicted_error(self, image_id: str) -> ImageReferenceError:
        if image_id.startswith("crop-"):
            kind, again = "crop", "make the crop again (zoom_region, or a box on its image)"
        else:
            kind, again = "image", "pass the image again"
        return ImageReferenceError(
            f"{kind} id {image_id!r} was evicted from the cache (it keeps the {self.max_cached} most "
            f"recently used images and crops, {self.max_cached_bytes / 2**20:,.0f} MiB of decoded pixels "
            f"at most); {again}. {self._known_ids()}"
        )

    def _known_ids(self) -> str:
        ids = self.ids()
        if not ids:
            return "No images are registered yet."
        shown = ", ".join(repr(i) for i in ids[-_SHOWN_IDS:])
        more = f" (and {len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else ""
        return f"Known image ids: {shown}{more}."

    # -- resolving references ------------------------------------------------------------------

    def resolve(self, reference: str) -> RegisteredImage:
        """The image a planner's reference names; resolved images are cached under an id.

        Args:
            reference: An image id, a base64 ``data:image/...`` URI, an http(s) URL (if enabled) or
                a file path under an allowed root (absolute, or relative to a root).

        Raises:
            ImageReferenceError: If the reference names nothing that may be read, or what it names is
                not an image; the message says why and what to pass instead.
        """
        if not isinstance(reference, str) or not reference.strip():
            raise ImageReferenceError("the image reference is empty; pass an image id, a data URI or a path")
        reference = reference.strip()
        if reference in self:
            return self.get(reference)
        with self._lock:
            evicted = reference in self._evicted
        if evicted:
            raise self._evicted_error(reference)
        if reference.startswith("data:"):
            return self._from_data_uri(reference)
        scheme = _SCHEME.match(reference)
        if scheme:
            if scheme.group(1).lower() not in ("http", "https"):
                raise ImageReferenceError(
                    f"{scheme.group(1)}:// references are not supported; pass an image id, a data URI"
                    + (", a path" if self.allowed_roots else "")
                    + (" or an http(s) URL" if self.allow_urls else "")
                )
            return self._from_url(reference)
        return self._from_path(reference)

    def _decoded(self, data: bytes, what: str, source: Source) -> RegisteredImage:
        try:
            picture = load_image(data, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise ImageReferenceError(f"{what} is not a readable image ({exc})") from None
        digest = image_hash(picture)
        return self._cache(
            RegisteredImage(id=f"img-{digest[:12]}", image=picture, hash=digest, source=source)
        )

    def _from_data_uri(self, uri: str) -> RegisteredImage:
        if len(uri) > self.max_bytes * 4 // 3 + 256:
            raise ImageReferenceError(f"the data URI is larger than the limit of {self.max_bytes:,} bytes")
        try:
            data = decode_data_uri(uri)
        except ImageError as exc:
            raise ImageReferenceError(f"the image reference is a malformed data URI: {exc}") from None
        return self._decoded(data, "the data URI", "data_uri")

    def _from_url(self, url: str) -> RegisteredImage:
        if not self.allow_urls:
            raise ImageReferenceError(
                f"URLs are disabled by the host, so {_short(url)} was not fetched; pass an image id or "
                "a base64 data URI instead. " + self._known_ids()
            )
        return self._decoded(self._fetch(url), f"the content of {_short(url)}", "url")

    def _fetch(self, url: str) -> bytes:
        try:
            import httpx
        except ImportError:  # pragma: no cover - httpx ships with the tools and mcp extras
            raise ImageReferenceError("URL support needs httpx: pip install 'df-agent[tools]'") from None
        client = self._http_client or httpx.Client(follow_redirects=True, max_redirects=5)
        try:
            with client.stream("GET", url, timeout=self.url_timeout) as response:
                response.raise_for_status()
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageReferenceError(
                        f"{_short(url)} is {int(declared):,} bytes, more than the limit of {self.max_bytes:,}"
                    )
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise ImageReferenceError(
                            f"{_short(url)} is larger than the limit of {self.max_bytes:,} bytes"
                        )
                return bytes(data)
        except httpx.HTTPStatusError as exc:
            raise ImageReferenceError(
                f"{_short(url)} could not be fetched: HTTP {exc.response.status_code}"
            ) from None
        except httpx.TimeoutException:
            raise ImageReferenceError(
                f"{_short(url)} could not be fetched: timed out after {self.url_timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ImageReferenceError(f"{_short(url)} could not be fetched: {exc}") from None
        finally:
            if self._http_client is None:
                client.close()

    def _from_path(self, reference: str) -> RegisteredImage:
        if not self.allowed_roots:
            raise ImageReferenceError(
                f"{reference!r} is not a known image id, and file paths are disabled (the host allowed "
                "no folders). Pass an image id or a base64 data URI. " + self._known_ids()
            )
        raw = Path(reference)
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.allowed_roots]
        outside = False
        for candidate in candidates:
            real = Path(os.path.realpath(candidate))
            if not any(real.is_relative_to(root) for root in self.allowed_roots):
                outside = True
                continue
            data = self._read_file(real, reference)
            if data is not None:
                return self._decoded(data, f"file {reference!r}", "file")
        roots = ", ".join(str(root) for root in self.allowed_roots)
        if outside:
            raise ImageReferenceError(
                f"{reference!r} is outside the folders the host allowed ({roots}); only files inside them "
                "can be read"
            )
        raise ImageReferenceError(
            f"{reference!r} is neither a known image id nor a file under the allowed folders ({roots}). "
            + self._known_ids()
        )

    def _read_file(self, real: Path, reference: str) -> bytes | None:
        """The bytes of the regular file at `real` (already checked to be inside a root), None if absent."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageReferenceError(f"file {reference!r} cannot be opened: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ImageReferenceError(f"{reference!r} is a folder, not an image file")
            if not stat.S_ISREG(info.st_mode):
                raise ImageReferenceError(
                    f"{reference!r} is not a regular file ({_file_kind(info.st_mode)}), so it was not read"
                )
            if info.st_size > self.max_bytes:
                raise ImageReferenceError(
                    f"file {reference!r} is {info.st_size:,} bytes, more than the limit of {self.max_bytes:,}"
                )
            if info.st_size == 0:
                raise ImageReferenceError(f"file {reference!r} is empty")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                return handle.read(self.max_bytes + 1)
        finally:
            os.close(fd)


def decoded_bytes(image: Image.Image) -> int:
    """The bytes `image`'s decoded pixels take: width * height * bands."""
    return image.width * image.height * len(image.getbands())


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISFIFO: "a named pipe",
        stat.S_ISSOCK: "a socket",
    }  # fmt: skip
    return next((kind for test, kind in kinds.items() if test(mode)), "not a file")


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_CACHED_BYTES",
    "ImageReferenceError",
    "ImageRegistry",
    "RegisteredImage",
    "Source",
    "decoded_bytes",
]
