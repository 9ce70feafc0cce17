"""The image registry: ids, data URIs, URLs only when enabled, paths only inside the allowed roots."""

from __future__ import annotations

import builtins
import io
import os
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from df_agent.agents.registry import ImageReferenceError, ImageRegistry
from df_agent.boxes import Box
from df_agent.images import ImageError, image_hash, to_data_uri


def picture(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An allowed root with an image, a text file, a folder and links; a secret image outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    picture().save(root / "sub" / "red.png")
    (root / "notes.txt").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    picture((0, 0, 255)).save(outside / "secret.png")  # a valid image: reading it would succeed
    (root / "secret_link.png").symlink_to(outside / "secret.png")
    (root / "outside_dir").symlink_to(outside, target_is_directory=True)
    (root / "inside_link.png").symlink_to(root / "sub" / "red.png")
    return {"root": root, "outside": outside}


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened through os.open or open() during the test, resolved."""
    paths: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real_os_open(path, *args, **kwargs)

    def spy_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike):
            paths.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    return paths


# -- ids -------------------------------------------------------------------------------------------


def test_register_gives_a_content_id_or_the_hosts_id() -> None:
    registry = ImageRegistry()
    image = picture()
    default_id = registry.register(image)
    assert default_id == f"img-{image_hash(image)[:12]}"
    assert registry.register(png_bytes(image), "scene") == "scene"
    assert registry.resolve("scene").hash == registry.resolve(default_id).hash == image_hash(image)
    assert registry.get("scene").source == "host"
    assert set(registry.ids()) == {default_id, "scene"}


@pytest.mark.parametrize("bad_id", ["", "a/b", "../x", "-lead", "x" * 65, "has space"])
def test_register_rejects_malformed_ids(bad_id: str) -> None:
    with pytest.raises(ValueError, match="image id"):
        ImageRegistry().register(picture(), bad_id)


def test_unknown_id_lists_the_known_ones() -> None:
    registry = ImageRegistry()
    registry.register(picture(), "scene")
    with pytest.raises(ImageReferenceError, match=r"unknown image id 'crop-123'.*'scene'"):
        registry.get("crop-123")
    with pytest.raises(ImageReferenceError, match=r"not a known image id.*file paths are disabled.*'scene'"):
        registry.resolve("crop-123")


def test_crops_keep_their_parent_box_and_box_text() -> None:
    registry = ImageRegistry()
    registry.register(picture(size=(100, 80)), "scene")
    parent = registry.get("scene")
    crop = registry.add_crop(parent, Box(x1=10, y1=10, x2=50, y2=50), box_text="[0.1]")
    assert crop.id.startswith("crop-") and crop.source == "crop" and not crop.is_root
    assert crop.parent_hash == parent.hash and crop.parent_id == "scene" and crop.box_text == "[0.1]"
    assert (crop.root_id, crop.root_hash) == ("scene", parent.hash)
    assert registry.resolve(crop.id).image.tobytes() == parent.image.crop((10, 10, 50, 50)).tobytes()
    other = registry.add_crop(parent, Box(x1=10, y1=10, x2=50, y2=50), box_text="[0.2]")
    assert other.id != crop.id  # the same pixels reached from another box text are another crop


def test_a_crop_of_a_crop_knows_its_root_and_is_cut_from_the_roots_pixels() -> None:
    registry = ImageRegistry()
    registry.register(picture(size=(200, 160)), "scene")
    root = registry.get("scene")
    first = registry.add_crop(root, Box(x1=40, y1=30, x2=140, y2=130), box_text="a")
    second = registry.add_crop(first, Box(x1=10, y1=20, x2=50, y2=60), box_text="b")  # first's pixels
    assert (second.root_id, second.parent_id, second.box) == (
        "scene",
        first.id,
        Box(x1=10, y1=20, x2=50, y2=60),
    )
    assert second.region == Box(x1=50, y1=50, x2=90, y2=90)  # root pixels
    assert registry.root_of(second) is root and registry.root_of(root) is root
    # a resized view: its crop is cut from the root at full resolution, not from the shrunk pixels
    view = registry.add_crop(root, Box(x1=0, y1=0, x2=200, y2=160), box_text="v", size=(50, 40))
    assert view.image.size == (50, 40) and view.frame.scale_x == 4
    inner = registry.add_crop(view, Box(x1=10, y1=10, x2=20, y2=20), box_text="w")
    assert inner.image.size == (40, 40) and inner.region == Box(x1=40, y1=40, x2=80, y2=80)
    assert inner.image.tobytes() == root.image.crop((40, 40, 80, 80)).tobytes()


def test_using_a_crop_keeps_its_root_and_a_dropped_root_takes_its_crops() -> None:
    registry = ImageRegistry(max_cached=3)
    root = registry.resolve(to_data_uri(picture((10, 0, 0), (64, 64))))
    crop = registry.add_crop(root, Box(x1=0, y1=0, x2=16, y2=16), box_text="a")
    other = registry.resolve(to_data_uri(picture((20, 0, 0))))
    registry.get(crop.id)  # uses the root too: `other` is now the oldest
    registry.resolve(to_data_uri(picture((30, 0, 0))))
    assert other.id not in registry and root.id in registry and crop.id in registry
    for i in (40, 50):  # now the root is the oldest; it goes, and its crop with it
        registry.resolve(to_data_uri(picture((i, 0, 0))))
    assert root.id not in registry and crop.id not in registry
    with pytest.raises(ImageReferenceError, match=r"was evicted.*a crop goes with its root"):
        registry.get(crop.id)


def test_a_new_crop_never_evicts_its_own_root() -> None:
    side = 100
    registry = ImageRegistry(max_cached_bytes=side * side * 3 + 10)
    root = registry.resolve(to_data_uri(picture((10, 0, 0), (side, side))))
    crop = registry.add_crop(root, Box(x1=0, y1=0, x2=50, y2=50), box_text="a")
    assert root.id in registry and crop.id in registry  # over the budget, but both held
    assert registry.cached_bytes() == side * side * 3 + 50 * 50 * 3


def test_replacing_a_host_image_drops_the_crops_of_the_old_pixels() -> None:
    registry = ImageRegistry()
    registry.register(picture((10, 0, 0), (64, 64)), "scene")
    crop = registry.add_crop(registry.get("scene"), Box(x1=0, y1=0, x2=16, y2=16), box_text="a")
    registry.register(picture((10, 0, 0), (64, 64)), "scene")  # the same pixels: the crop stays
    assert crop.id in registry
    registry.register(picture((99, 0, 0), (64, 64)), "scene")
    assert crop.id not in registry
    with pytest.raises(ImageReferenceError, match="was evicted"):
        registry.get(crop.id)


def test_cache_drops_the_least_recently_used_but_never_host_images() -> None:
    registry = ImageRegistry(max_cached=2)
    registry.register(picture((1, 1, 1)), "host")
    ids = [registry.resolve(to_data_uri(picture((i, 0, 0)))).id for i in (10, 20)]
    registry.resolve(ids[0])  # touch the first: the second is now the oldest
    third = registry.resolve(to_data_uri(picture((30, 0, 0)))).id
    assert ids[0] in registry and third in registry and "host" in registry
    assert ids[1] not in registry
    assert len(registry) == 3


def test_the_cache_is_bounded_by_decoded_bytes() -> None:
    """Small data URIs of large plain images: the budget, not the count, decides what stays."""
    side = 2000  # 12 MB of decoded RGB from a data URI of about 12 kB
    registry = ImageRegistry(max_cached_bytes=30 * 2**20)
    uris = [to_data_uri(picture((i, 0, 0), (side, side))) for i in (10, 20, 30, 40)]
    assert max(len(uri) for uri in uris) < 50_000
    ids = [registry.resolve(uri).id for uri in uris]
    assert registry.cached_bytes() == 2 * side * side * 3 <= registry.max_cached_bytes
    assert ids[2:] == registry.ids() and ids[0] not in registry and ids[1] not in registry


def test_an_evicted_id_says_it_was_evicted() -> None:
    registry = ImageRegistry(max_cached=1)
    registry.register(picture(size=(64, 64)), "scene")
    parent = registry.get("scene")
    first = registry.add_crop(parent, Box(x1=0, y1=0, x2=8, y2=8), box_text="a")
    registry.add_crop(parent, Box(x1=0, y1=0, x2=9, y2=9), box_text="b")
    for lookup in (registry.get, registry.resolve):
        with pytest.raises(ImageReferenceError, match=f"crop id '{first.id}' was evicted from the cache"):
            lookup(first.id)
    again = registry.add_crop(parent, Box(x1=0, y1=0, x2=8, y2=8), box_text="a")
    assert registry.get(first.id) is again  # made again: the same id is back
    with pytest.raises(ImageReferenceError, match="unknown image id 'crop-never'"):
        registry.get("crop-never")


def test_a_single_image_over_the_budget_is_still_held() -> None:
    registry = ImageRegistry(max_cached_bytes=10)
    entry = registry.resolve(to_data_uri(picture()))
    assert registry.get(entry.id) is entry and registry.cached_bytes() == 40 * 30 * 3


def test_concurrent_crops_are_all_kept() -> None:
    registry = ImageRegistry(max_cached=1000)
    registry.register(picture(size=(64, 64)), "scene")
    parent = registry.get("scene")

    def add(worker: int) -> None:
        for i in range(25):
            box = Box(x1=0, y1=0, x2=1 + i, y2=1 + worker)
            registry.add_crop(parent, box, box_text=f"{worker}-{i}")

    threads = [threading.Thread(target=add, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(registry) == 1 + 8 * 25


# -- data URIs -------------------------------------------------------------------------------------


def test_data_uri_resolves_and_gets_an_id() -> None:
    registry = ImageRegistry()
    image = picture()
    entry = registry.resolve(to_data_uri(image))
    assert entry.source == "data_uri" and entry.hash == image_hash(image)
    assert registry.resolve(entry.id) is entry


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:text/plain;base64,aGVsbG8=", "malformed data URI.*not an image"),
        ("data:image/png;base64,!!!", "malformed data URI.*invalid base64"),
        ("data:image/png;base64,aGVsbG8=", "data URI is not a readable image"),
    ],
)
def test_bad_data_uris_say_what_is_wrong(uri: str, message: str) -> None:
    with pytest.raises(ImageReferenceError, match=message):
        ImageRegistry().resolve(uri)


def test_data_uri_over_the_byte_limit_is_refused_before_decoding() -> None:
    registry = ImageRegistry(max_bytes=100)
    with pytest.raises(ImageReferenceError, match="larger than the limit of 100 bytes"):
        registry.resolve(to_data_uri(Image.effect_noise((64, 64), 50).convert("RGB")))


# -- paths -----------------------------------------------------------------------------------------


def test_paths_are_disabled_without_roots(tree: dict[str, Path], opened: list[str]) -> None:
    with pytest.raises(ImageReferenceError, match="file paths are disabled"):
        ImageRegistry().resolve(str(tree["root"] / "sub" / "red.png"))
    assert opened == []


def test_relative_and_absolute_paths_inside_a_root(tree: dict[str, Path]) -> None:
    registry = ImageRegistry([tree["root"]])
    relative = registry.resolve("sub/red.png")
    absolute = registry.resolve(str(tree["root"] / "sub" / "red.png"))
    assert relative.source == "file" and relative.hash == absolute.hash == image_hash(picture())
    assert registry.resolve("inside_link.png").hash == relative.hash  # a link that stays inside is fine
    assert registry.resolve("sub/../sub/red.png").hash == relative.hash


@pytest.mark.parametrize(
    "reference",
    [
        "../../etc/passwd",
        "../outside/secret.png",
        "/etc/passwd",
        "secret_link.png",
        "outside_dir/secret.png",
        "sub/../../outside/secret.png",
    ],
)
def test_nothing_outside_the_roots_is_read(reference: str, tree: dict[str, Path], opened: list[str]) -> None:
    registry = ImageRegistry([tree["root"]])
    with pytest.raises(ImageReferenceError, match="outside the folders the host allowed"):
        registry.resolve(reference)
    root = os.path.realpath(tree["root"])
    assert all(Path(path).is_relative_to(root) for path in opened), opened


def test_the_outside_file_is_readable_so_the_refusal_is_the_registry(tree: dict[str, Path]) -> None:
    assert ImageRegistry([tree["outside"]]).resolve("secret.png").image.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("notes.txt", "file 'notes.txt' is not a readable image"),
        ("empty.png", "is empty"),
        ("sub", "is a folder"),
        ("missing.png", "neither a known image id nor a file under the allowed folders"),
    ],
)
def test_bad_files_say_what_is_wrong(reference: str, message: str, tree: dict[str, Path]) -> None:
    with pytest.raises(ImageReferenceError, match=message):
        ImageRegistry([tree["root"]]).resolve(reference)


def test_files_over_the_byte_limit_are_not_read(tree: dict[str, Path]) -> None:
    with pytest.raises(ImageReferenceError, match="more than the limit of 10"):
        ImageRegistry([tree["root"]], max_bytes=10).resolve("sub/red.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_is_refused_without_blocking(tree: dict[str, Path]) -> None:
    os.mkfifo(tree["root"] / "pipe.png")
    with pytest.raises(ImageReferenceError, match="not a regular file"):
        ImageRegistry([tree["root"]]).resolve("pipe.png")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_devices_are_refused_as_devices() -> None:
    with pytest.raises(ImageReferenceError, match=r"'zero' is not a regular file \(a character device\)"):
        ImageRegistry(["/dev"]).resolve("zero")
    with pytest.raises(ImageError, match="is a character device"):
        ImageRegistry().register("/dev/zero")  # the host's own paths too: never "empty (0 bytes)"


def test_roots_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an existing folder"):
        ImageRegistry([tmp_path / "nope"])


# -- URLs ------------------------------------------------------------------------------------------


def mock_client(handler) -> tuple[httpx.Client, list[httpx.Request]]:
    requests: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return handler(request)

    return httpx.Client(transport=httpx.MockTransport(record)), requests


def test_urls_are_disabled_by_default_and_nothing_is_fetched() -> None:
    client, requests = mock_client(lambda request: httpx.Response(200, content=png_bytes(picture())))
    with pytest.raises(ImageReferenceError, match="URLs are disabled by the host"):
        ImageRegistry(http_client=client).resolve("https://example.com/cat.png")
    assert requests == []


def test_enabled_urls_are_fetched_and_cached() -> None:
    client, requests = mock_client(lambda request: httpx.Response(200, content=png_bytes(picture())))
    registry = ImageRegistry(allow_urls=True, http_client=client)
    entry = registry.resolve("https://example.com/cat.png")
    assert entry.source == "url" and entry.hash == image_hash(picture())
    assert registry.resolve(entry.id) is entry
    assert [str(r.url) for r in requests] == ["https://example.com/cat.png"]


def _timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("slow", request=request)


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (lambda r: httpx.Response(404), "HTTP 404"),
        (lambda r: httpx.Response(200, content=b"<html>hello</html>"), "is not a readable image"),
        (lambda r: httpx.Response(200, headers={"content-length": "999999"}, content=b"x"), "999,999 bytes"),
        (lambda r: httpx.Response(200, content=iter([b"x" * 600] * 3)), "larger than the limit of 1,000"),
        (_timeout, "timed out after 2 s"),
    ],
    ids=["404", "html", "declared-too-large", "streamed-too-large", "timeout"],
)
def test_url_failures_say_what_is_wrong(handler, message: str) -> None:
    client, _ = mock_client(handler)
    registry = ImageRegistry(allow_urls=True, http_client=client, max_bytes=1000, url_timeout=2)
    with pytest.raises(ImageReferenceError, match=message):
        registry.resolve("http://example.com/x.png")


@pytest.mark.parametrize("reference", ["file:///etc/passwd", "ftp://example.com/a.png"])
def test_other_schemes_are_refused(reference: str, opened: list[str]) -> None:
    with pytest.raises(ImageReferenceError, match="references are not supported"):
        ImageRegistry(allow_urls=True).resolve(reference)
    assert opened == []


def test_empty_reference() -> None:
    with pytest.raises(ImageReferenceError, match="empty"):
        ImageRegistry().resolve("  ")
