"""Where a checkpoint comes from, checked before transformers is asked to load it.

`resolve_checkpoint` turns a local folder or a hub id into something loadable, or fails at once
with a message that says what to do: a path that does not exist says "folder not found"; a hub
id without network fails after one connectivity check (seconds, not minutes of retries) and
names ``HF_HUB_OFFLINE=1`` and local folders. `quiet_loading` hides transformers' weight-loading
bar unless loading takes a while.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A hub id is "name" or "namespace/name": letters, digits, "-", "_", "." (not leading).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
CONNECT_TIMEOUT_S = 3.0
LOADING_BAR_DELAY_S = 2.0


class CheckpointNotFoundError(OSError):
    """A checkpoint named by path or hub id cannot be loaded; the message says what to do instead."""


def looks_like_folder(source: str) -> bool:
    """True when `source` can only be a path (absolute, relative with ./ or ../, ~, or not a hub id)."""
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or "\\" in source
        or source.endswith("/")
        or _HUB_ID.match(source) is None
    )


def resolve_checkpoint(source: str | os.PathLike) -> str:
    """What to hand `from_pretrained`: a local folder, a cached hub snapshot or a reachable hub id.

    Args:
        source: A checkpoint folder or a hub id (``namespace/name``).

    Returns:
        The folder (as given) or the hub id; without network, the hub id's folder in the local
        hub cache when it is there.

    Raises:
        CheckpointNotFoundError: The folder does not exist, is a file, or the hub id can be
            neither reached nor found in the local cache.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise CheckpointNotFoundError(f"{text!r} is a file; a checkpoint is a folder (config.json, weights)")
    if isinstance(source, os.PathLike) or looks_like_folder(text):
        raise CheckpointNotFoundError(
            f"folder not found: {text!r} (a checkpoint folder, or a hub id such as 'namespace/name')"
        )
    return _resolve_hub_id(text)


def _resolve_hub_id(repo_id: str) -> str:
    from huggingface_hub import constants

    cached = _cached_snapshot(repo_id)
    hint = (
        "pass a local checkpoint folder (download it where there is network: `hf download "
        f"{repo_id} --local-dir DIR`), or set HF_HUB_OFFLINE=1 to load only from the local hub cache"
    )
    if constants.is_offline_mode():
        if cached is None:
            raise CheckpointNotFoundError(
                f"{repo_id!r} is not a local folder and not in the local hub cache, and HF_HUB_OFFLINE=1 "
                f"forbids downloading it; {hint.split(', or set')[0]}"
            )
        return cached
    error = _unreachable(constants.ENDPOINT, repo_id)
    if error is None:
        return repo_id
    if cached is not None:
        return cached
    raise CheckpointNotFoundError(
        f"{repo_id!r} is not a local folder, and the Hugging Face hub ({constants.ENDPOINT}) cannot give it "
        f"({error}); {hint}"
    )


def _unreachable(endpoint: str, repo_id: str) -> str | None:
    """None when the hub answers for `repo_id` (or asks for a login), else why not: one request, no retry."""
    import httpx

    url = f"{endpoint.rstrip('/')}/api/models/{repo_id}"
    try:
        status = httpx.get(
            url, timeout=httpx.Timeout(CONNECT_TIMEOUT_S * 2, connect=CONNECT_TIMEOUT_S)
        ).status_code
    except httpx.HTTPError as err:
        return (
            f"no connection: {type(err).__name__}: {err}"
            if str(err)
            else f"no connection: {type(err).__name__}"
        )
    if status == 404:
        return f"no model of that name there: {url} answered 404"
    if status >= 500:
        return f"{url} answered {status}"
    return None  # 200, or 401/403 for a gated or private model: transformers says what to do


def _cached_snapshot(repo_id: str) -> str | None:
    """The folder of `repo_id` in the local hub cache, if a snapshot with a config is there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


@contextmanager
def quiet_loading(delay: float = LOADING_BAR_DELAY_S) -> Iterator[None]:
    """Inside, transformers' progress bars appear only once they have run for `delay` seconds."""
    from transformers.utils import logging

    def delayed(factory, args, kwargs):
        return factory(*args, **{"delay": delay, **kwargs})

    previous = logging.set_tqdm_hook(delayed)
    try:
        yield
    finally:
        logging.set_tqdm_hook(previous)


__all__ = [
    "CheckpointNotFoundError",
    "looks_like_folder",
    "quiet_loading",
    "resolve_checkpoint",
]
