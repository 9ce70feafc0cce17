"""Images an agent can name: ids for registered images and crops, and safe resolution of references.

Planners pass images as strings. `ImageRegistry.resolve` turns such a reference into an image, in this
order: an id the registry holds (images the host registered, crops made by a zoom, images resolved
before), a base64 ``data:image/...`` URI, an http(s) URL (only when the host enables URLs), or a file
path under one of the host's allowed roots (none by default). Paths are resolved with symlinks and
``..`` followed *before* the containment check, and the file read is the resolved one, so nothing
outside the roots is ever opened. Anything else raises `ImageReferenceError` with a message a planner
can act on. The module knows nothing of LangChain or MCP: both adapters share it.

Every image held knows its root and its frame (`df_agent.frames.Frame`): a whole image is its own root;
a crop, or a crop of a crop, records the root's id and where it sits in the root, and its pixels are
always cut from the root's full-resolution pixels (never from an already resized crop). So that a
crop's root stays reachable, using a crop also counts as using its root (least-recently-used order),
and dropping a root from the cache drops its crops with it.
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
from df_agent.frames import Frame, cut, cut_region
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
IDENTITY = Frame()


@dataclass(frozen=True)
class RegisteredImage:
    """An image the registry holds, under its id.

    Attributes:
        id: The id planners use to refer to it.
        image: The decoded RGB image.
        hash: Its content hash (`df_agent.images.image_hash`).
        source: Where it came from: "host", "data_uri", "file", "url" or "crop".
        root_id: The id of its root image (its own id for a whole image).
        root_hash: The root's content hash (its own hash for a whole image).
        frame: Its transform to the root's pixels (the identity for a whole image).
        parent_id: For a crop: the id of the image it was cut from (the root, or another crop).
        parent_hash: For a crop: the content hash of the image it was cut from.
        box: For a crop: the cropped region in the parent image's pixels.
        box_text: For a crop: the box as the model writes it (its own reply, or the planner's box
            written in the model's convention) in the parent's frame, which the micro step continues from.
    """

    id: str
    image: Image.Image
    hash: str
    source: Source
    root_id: str = ""
    root_hash: str = ""
    frame: Frame = IDENTITY
    parent_id: str | None = None
    parent_hash: str | None = None
    box: Box | None = None
    box_text: str | None = None

    def __post_init__(self) -> None:
        if not self.root_id:  # a whole image is its own root
            object.__setattr__(self, "root_id", self.id)
            object.__setattr__(self, "root_hash", self.hash)

    @property
    def is_root(self) -> bool:
        """Whether this is a whole image (its own root), not a crop."""
        return self.source != "crop"

    @property
    def region(self) -> Box:
        """The part of the root this image shows, in the root's pixels."""
        return self.frame.extent(self.image.size)


class ImageRegistry:
    """Holds images under ids and resolves the image references planners pass.

    Images the host registers are kept until replaced; images resolved from data URIs, files and URLs,
    and crops, are cached under ids too (so a planner can refer to them again), the least recently
    used ones dropped beyond `max_cached` entries or `max_cached_bytes` of decoded pixels (the newest
    entry, and the root of a new crop, are always kept). Each crop counts its own pixels; its root's
    pixels count once, in the root's entry (nothing for a host image). Using a crop also uses its root,
    so crops go before their root; a root dropped takes its crops with it, so a crop held can always be
    cut again from its root's pixels. An id dropped so is remembered: asking for it again says it was
    evicted. Safe to share between threads.

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
            replaced = self._pinned.get(entry.id) or self._cached.get(entry.id)
            if replaced is not None and replaced.hash != digest:  # its crops show other pixels now
                for crop_id in [k for k, v in self._cached.items() if v.root_id == entry.id]:
                    self._drop(crop_id)
            dropped = self._cached.pop(entry.id, None)
            if dropped is not None:
                self._cached_bytes -= decoded_bytes(dropped.image)
            self._evicted.pop(entry.id, None)
            self._pinned[entry.id] = entry
        return entry.id

    def add_crop(
        self, parent: RegisteredImage, box: Box, *, box_text: str, size: tuple[int, int] | None = None
    ) -> RegisteredImage:
        """Cut `box` of `parent` from the root's full-resolution pixels, keep it under a new id, return it.

        Args:
            parent: The image the region is given in: a whole image or a crop (of a crop...).
            box: The region in the parent's pixels; it is mapped to the root through the parent's
                frame and cut there at its integer hull, clipped to the root.
            box_text: The box as the model writes it (see `RegisteredImage.box_text`).
            size: Hold the crop resized to ``(width, height)`` (a view); default its root pixels
                unchanged (scale 1).

        Raises:
            ImageReferenceError: If the parent's root is no longer held.
            ValueError: If the region does not lie within the root image.
        """
        root = self.root_of(parent)
        region = cut_region(parent.frame.to_root(box), root.image.size)
        picture = cut(root.image, region, size)
        frame = Frame.of_region(region, None if size is None else picture.size)
        key = hashlib.sha256(
            f"{root.hash}\n{region.as_tuple()}\n{picture.size}\n{parent.hash}\n{box_text}".encode()
        ).hexdigest()
        entry = RegisteredImage(
            id=f"crop-{key[:12]}", image=picture, hash=image_hash(picture), source="crop",
            root_id=root.id, root_hash=root.hash, frame=frame, parent_id=parent.id,
            parent_hash=parent.hash, box=box, box_text=box_text,
        )  # fmt: skip
        self._cache(entry, keep=root.id)
        return entry

    def root_of(self, entry: RegisteredImage) -> RegisteredImage:
        """The whole image `entry` was cut from (`entry` itself for a whole image).

        Raises:
            ImageReferenceError: If the root is no longer held (replaced by the host under its id).
        """
        if entry.is_root:
            return entry
        with self._lock:
            root = self._pinned.get(entry.root_id) or self._cached.get(entry.root_id)
        if root is None or root.hash != entry.root_hash:
            raise ImageReferenceError(
                f"the image crop {entry.id!r} was cut from ({entry.root_id!r}) is no longer held; pass the "
                "image again and zoom again"
            )
        return root

    def get(self, image_id: str) -> RegisteredImage:
        """The entry under `image_id`.

        Raises:
            ImageReferenceError: If no image has that id, or the one it had was evicted from the cache.
        """
        with self._lock:
            entry = self._pinned.get(image_id) or self._cached.get(image_id)
            if entry is not None and image_id in self._cached:
                self._cached.move_to_end(image_id)
            if entry is not None and entry.root_id in self._cached:  # using a crop uses its root
                self._cached.move_to_end(entry.root_id)
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

    def _cache(self, entry: RegisteredImage, keep: str | None = None) -> RegisteredImage:
        """Hold `entry` (and touch `keep`, its root); drop the least recently used beyond the budgets.

        The new entry and `keep` are never dropped; dropping a root drops its crops too.
        """
        with self._lock:
            if entry.id in self._pinned:
                return self._pinned[entry.id]
            held = self._cached.pop(entry.id, None)
            if held is not None:
                self._cached_bytes -= decoded_bytes(held.image)
            self._cached[entry.id] = entry
            self._cached_bytes += decoded_bytes(entry.image)
            self._evicted.pop(entry.id, None)
            if keep is not None and keep in self._cached:
                self._cached.move_to_end(keep)
            protected = {entry.id, keep}
            while len(self._cached) > self.max_cached or self._cached_bytes > self.max_cached_bytes:
                oldest = next((k for k in self._cached if k not in protected), None)
                if oldest is None:
                    break
                self._drop(oldest)
        return entry

    def _drop(self, image_id: str) -> None:
        """Evict `image_id` from the cache, and its crops with it if it is a root (lock held)."""
        dropped = self._cached.pop(image_id, None)
        if dropped is None:
            return
        self._cached_bytes -= decoded_bytes(dropped.image)
        self._evicted[image_id] = None
        if len(self._evicted) > _REMEMBERED_EVICTIONS:
            self._evicted.popitem(last=False)
        if dropped.is_root:
            for crop_id in [k for k, v in self._cached.items() if v.root_id == image_id]:
                self._drop(crop_id)

    def _evicted_error(self, image_id: str) -> ImageReferenceError:
        if image_id.startswith("crop-"):
            kind, again = (
                "crop",
                "make the crop again (zoom_region, or a box on its image; a crop goes with its root)",
            )
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
