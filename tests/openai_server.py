"""A local OpenAI-compatible test server backed by an `HFBackend`, in three profiles.

Profiles (what real servers offer):
- ``"vllm"``: vLLM's API. ``GET /v1/models``; ``POST /tokenize`` with chat ``messages`` (the token
  ids of the rendered chat, images expanded); ``POST /v1/chat/completions`` with a greedy reply,
  generation ``logprobs``, and with ``prompt_logprobs=k`` vLLM's top-level ``prompt_logprobs`` list
  (``None`` for the first token, then per token a dict from token id, as a string, to
  ``{"logprob", "rank", "decoded_token"}``: the prompt's own token first, then the top k).
- ``"hosted"``: a hosted chat API (OpenAI's shape): chat completions with generation ``logprobs``
  (``choices[0].logprobs.content``); no ``/tokenize``; vLLM's extra fields are refused with 400.
- ``"bare"``: chat completions only; ``logprobs`` and unknown fields are ignored (``logprobs: null``).
- ``"ollama"``: Ollama. Its OpenAI-compatible ``/v1`` (chat completions with generation
  ``logprobs``, unknown fields ignored) and its native API: ``GET /api/tags``, ``GET /api/version``,
  ``POST /api/chat`` (``messages`` with base64 ``images``, ``options.num_predict``, ``logprobs``;
  streamed as JSON lines by default, each token's line with its ``logprobs``).

Every profile streams (``stream: true``, server-sent events) and takes an optional bearer key.
`delay` seconds are slept before each answer, outside the model: a simulated network round trip,
so concurrent requests overlap it. The model serves one request at a time, or with ``batching``
as vLLM and hosted APIs do: requests that arrive together are decoded side by side in the same
forward passes, and computed prefixes (images included) are kept between requests (the backend's
fast path in one long-lived session); the replies are the same. Faults can be scheduled on the
n-th request to a path: "503" (an error answer), "timeout" (no answer until the server stops) and
"drop" (the connection closed without an answer). Every request is recorded with the fault it
got, so tests count what reached the server.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Empty, SimpleQueue
from typing import Any, Literal, TypeVar

import torch

from df_agent.backends.base import Conversation, Request
from df_agent.backends.hf import HFBackend
from df_agent.images import load_image

FAULTS = ("503", "timeout", "drop")
PROFILES = ("vllm", "hosted", "bare", "ollama")
Profile = Literal["vllm", "hosted", "bare", "ollama"]
VLLM_ONLY_FIELDS = ("prompt_logprobs", "add_generation_prompt", "continue_final_message")
T = TypeVar("T")
Reply = tuple[int, str, list[tuple[str, float]]]  # prompt tokens, content, (token, log-probability)


class BadRequest(Exception):
    """A request the real server would refuse with 400 (or `status`)."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Record:
    """One request as the server saw it."""

    path: str
    fault: str | None
    body: dict = field(repr=False)


class OpenAITestServer:
    """An in-process HTTP server on a free loopback port, in a thread.

    Args:
        backend: The model that answers.
        model_name: The name it is served under.
        profile: "vllm", "hosted" or "bare" (see the module docstring).
        delay: Seconds slept before each answer (a simulated round trip).
        batching: Decode requests that arrive within `batch_window` seconds of each other together,
            keeping computed prefixes between requests (see the module docstring).
        api_key: When set, requests without ``Authorization: Bearer <api_key>`` get 401.
        port: The loopback port (0: a free one).
    """

    def __init__(
        self,
        backend: HFBackend,
        model_name: str = "df-test",
        *,
        profile: Profile = "vllm",
        delay: float = 0.0,
        batching: bool = False,
        batch_window: float = 0.002,
        api_key: str | None = None,
        port: int = 0,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
        self.backend = backend
        self.model_name = model_name
        self.profile = profile
        self.delay = delay
        self.api_key = api_key
        self.records: list[Record] = []
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests the server held at once since the last reset
        self.busy_s = 0.0  # seconds the model worked (requests wait for it in turn) since the last reset
        self.largest_batch = 0  # the most generations decoded together since the last reset
        self._faults: dict[tuple[str, int], str] = {}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()  # requests, faults and counters
        self._model_lock = threading.Lock()  # one request at the model at a time
        self._stopped = threading.Event()
        self._batcher = Batcher(backend, self._worked, batch_window) if batching else None
        self._http = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._http.daemon_threads = True
        self._http.handle_error = self._handle_error  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def _handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up is no error of the server's; anything else is printed as usual."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            ThreadingHTTPServer.handle_error(self._http, request, client_address)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        """The base URL, OpenAI style (``http://127.0.0.1:PORT/v1``)."""
        return self.root + "/v1"

    @property
    def root(self) -> str:
        """The server's root (``http://127.0.0.1:PORT``), where Ollama's native ``/api`` lives."""
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> OpenAITestServer:
        if self._batcher is not None:
            self._batcher.start()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._http.shutdown()
        self._http.server_close()
        if self._batcher is not None:
            self._batcher.stop()

    def fail(self, path: str, nth: int, fault: str) -> None:
        """Answer the `nth` (0-based, counted from now) request to `path` with `fault`."""
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        with self._lock:
            self._faults[(path, self._seen.get(path, 0) + nth)] = fault

    def count(self, path: str, *, faulted: bool | None = None) -> int:
        """Requests to `path` seen so far: all, only faulted ones, or only answered ones."""
        with self._lock:
            return sum(
                r.path == path and (faulted is None or (r.fault is not None) == faulted) for r in self.records
            )

    def reset(self) -> None:
        """Forget recorded requests and pending faults."""
        with self._lock:
            self.records.clear()
            self.max_in_flight = 0
            self.busy_s = 0.0
            self.largest_batch = 0
            self._faults.clear()
            self._seen.clear()

    def _admit(self, path: str, body: dict) -> str | None:
        """Record a request and return the fault scheduled for it, if any."""
        with self._lock:
            index = self._seen.get(path, 0)
            self._seen[path] = index + 1
            fault = self._faults.pop((path, index), None)
            self.records.append(Record(path, fault, body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return fault

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _worked(self, seconds: float, generations: int) -> None:
        with self._lock:
            self.busy_s += seconds
            self.largest_batch = max(self.largest_batch, generations)

    def _on_model(self, job: Callable[[], T]) -> T:
        """Run model work (tokenizer included) alone: in turn, or on the batching worker."""
        if self._batcher is not None:
            return self._batcher.run(job)
        with self._model_lock:
            start = time.perf_counter()
            try:
                return job()
            finally:
                self._worked(time.perf_counter() - start, 0)

    # -- the API -------------------------------------------------------------------------------

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "vllm",
                    "root": self.model_name,
                    "parent": None,
                    "max_model_len": self._max_model_len(),
                }
            ],
        }

    def tokenize(self, body: dict) -> dict:
        if self.profile != "vllm":
            raise BadRequest("Not Found", HTTPStatus.NOT_FOUND)
        self._check_model(body)
        conversation, generation_prompt, continue_final = self._chat_request(body)
        text = self.backend.render(
            conversation, add_generation_prompt=generation_prompt, continue_final=continue_final
        )
        ids = self._on_model(
            lambda: self.backend.encode([text], conversation.images)["input_ids"][0].tolist()
        )
        return {"count": len(ids), "max_model_len": self._max_model_len(), "tokens": ids, "token_strs": None}

    def chat_completions(self, body: dict) -> dict | list[dict]:
        """A chat completion, or with ``stream`` the list of its chunks."""
        self._check_model(body)
        if self.profile == "hosted":
            extra = [name for name in VLLM_ONLY_FIELDS if name in body]
            if extra:
                raise BadRequest(f"Unrecognized request argument supplied: {extra[0]}")
        if self.profile != "vllm":
            body = {k: v for k, v in body.items() if k not in VLLM_ONLY_FIELDS}
        conversation, generation_prompt, continue_final = self._chat_request(body)
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        top_k = body.get("prompt_logprobs")
        want_logprobs = bool(body.get("logprobs")) and self.profile != "bare"
        token_logprobs: list[tuple[str, float]] | None = None
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < -1:
                raise BadRequest("`prompt_logprobs` must be a positive value or -1.")
            text = self.backend.render(
                conversation, add_generation_prompt=generation_prompt, continue_final=continue_final
            )
            prompt_tokens, prompt_logprobs, content = self._on_model(
                lambda: self._prompt_logprobs(text, conversation, top_k)
            )
            completion_tokens = 1
        elif continue_final or not generation_prompt:
            raise BadRequest("the test server generates only after a generation prompt")
        else:
            prompt_tokens, content, token_logprobs = self._reply(Request(conversation, max_tokens))
            prompt_logprobs = None
            completion_tokens = len(token_logprobs)
        finish = "length" if completion_tokens >= max_tokens else "stop"
        logprobs = None
        if want_logprobs and token_logprobs is not None:
            logprobs = {"content": [_token_logprob(token, value) for token, value in token_logprobs]}
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            return self._chunks(ident, created, content, token_logprobs if logprobs else None, finish)
        vllm_fields = {"prompt_logprobs": prompt_logprobs, "kv_transfer_params": None}
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "tool_calls": []},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            },
            **(vllm_fields if self.profile == "vllm" else {}),
        }

    def ollama_tags(self) -> dict:
        """Ollama's ``GET /api/tags``: the one local model."""
        details = {
            "format": "safetensors",
            "family": "llava",
            "parameter_size": "small",
            "quantization_level": "F32",
        }
        entry = {"name": self.model_name, "model": self.model_name, "modified_at": _now(), "size": 0}
        return {
            "models": [
                {**entry, "digest": uuid.uuid5(uuid.NAMESPACE_URL, self.model_name).hex, "details": details}
            ]
        }

    def ollama_chat(self, body: dict) -> dict | list[dict]:
        """Ollama's ``POST /api/chat``: the reply, or with ``stream`` (its default) its JSON lines."""
        model = body.get("model")
        if model != self.model_name:
            raise BadRequest(f'model "{model}" not found, try pulling it first', HTTPStatus.NOT_FOUND)
        conversation = self._ollama_conversation(body.get("messages"))
        budget = int((body.get("options") or {}).get("num_predict") or -1)
        budget = budget if budget > 0 else 128  # -1, Ollama's default: until the model stops
        start = time.perf_counter()
        prompt_tokens, content, token_logprobs = self._reply(Request(conversation, budget))
        entries = [_ollama_logprob(token, value) for token, value in token_logprobs]
        final = {
            "done": True,
            "done_reason": "length" if len(token_logprobs) >= budget else "stop",
            "total_duration": int((time.perf_counter() - start) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "eval_count": len(token_logprobs),
        }
        logprobs = bool(body.get("logprobs")) or bool(body.get("top_logprobs"))
        if not body.get("stream", True):
            reply = {"role": "assistant", "content": content}
            return {"model": self.model_name, "created_at": _now(), "message": reply, **final} | (
                {"logprobs": entries} if logprobs else {}
            )
        pieces = [(entry["token"], [entry]) for entry in entries]
        if "".join(token for token, _ in pieces) != content:  # the decoded text is the reply
            pieces = [(content, entries)] if content else []
        lines = [
            {
                "model": self.model_name,
                "created_at": _now(),
                "message": {"role": "assistant", "content": piece},
                "done": False,
                **({"logprobs": piece_logprobs} if logprobs else {}),
            }
            for piece, piece_logprobs in pieces
        ]
        empty = {"role": "assistant", "content": ""}
        return [*lines, {"model": self.model_name, "created_at": _now(), "message": empty, **final}]

    def _ollama_conversation(self, messages: object) -> Conversation:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        conversation = Conversation()
        for message in messages:
            role, text = message.get("role"), message.get("content") or ""
            if role not in ("user", "assistant"):
                raise BadRequest(f"the test server takes user and assistant messages, not {role!r}")
            images = [load_image(base64.b64decode(data)) for data in message.get("images") or []]
            conversation = conversation.user(text, images) if role == "user" else conversation.assistant(text)
        if conversation.turns[-1].role != "user":
            raise BadRequest("the test server generates only after a user message")
        return conversation

    def _reply(self, request: Request) -> Reply:
        """The greedy reply to a request: in turn at the model, or batched."""
        if self._batcher is None:
            return self._on_model(lambda: self._generate(request))
        return self._batcher.generate(request)

    def _chunks(
        self, ident: str, created: int, content: str, logprobs: list[tuple[str, float]] | None, finish: str
    ) -> list[dict]:
        """The server-sent chunks of a streamed completion: the role, one per token, the finish."""

        def chunk(delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
                ],
            }

        chunks = [chunk({"role": "assistant", "content": ""})]
        if logprobs is None:
            pieces = [(content, None)] if content else []
        else:
            pieces = [(token, {"content": [_token_logprob(token, value)]}) for token, value in logprobs]
            if "".join(token for token, _ in logprobs) != content:  # the decoded text is the reply
                pieces = [(content, {"content": [_token_logprob(t, v) for t, v in logprobs]})]
        chunks += [chunk({"content": piece}, entry) for piece, entry in pieces]
        chunks.append(chunk({}, None, finish))
        return chunks

    def _generate(self, request: Request) -> Reply:
        """Greedy reply, its prompt's length, and each reply token with its log-probability."""
        conversation = request.conversation
        text = self.backend.render(conversation, add_generation_prompt=True)
        tokenizer = self.backend.tokenizer
        with torch.inference_mode():
            inputs = self.backend.encode([text], conversation.images)
            output = self.backend.model.generate(
                **inputs,
                max_new_tokens=request.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        prompt_ids = inputs["input_ids"][0].tolist()
        new_ids = output.sequences[0, len(prompt_ids) :].tolist()
        special = set(tokenizer.all_special_ids)
        token_logprobs = []
        for token_id, logits in zip(new_ids, output.logits, strict=False):
            if token_id in special:
                continue
            value = torch.log_softmax(logits[0].float(), dim=-1)[token_id].item()
            token_logprobs.append((tokenizer.decode([token_id]), value))
        content = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        return len(prompt_ids), content, token_logprobs

    def _prompt_logprobs(self, text: str, conversation: Conversation, top_k: int) -> tuple:
        """vLLM's prompt_logprobs for the rendered prompt, and the greedy next token as content."""
        with torch.inference_mode():
            inputs = self.backend.encode([text], conversation.images)
            logits = self.backend.model(**inputs).logits[0].float()
        ids = inputs["input_ids"][0].tolist()
        logprobs = torch.log_softmax(logits, dim=-1)
        decode = self.backend.tokenizer.decode
        entries: list[dict | None] = [None]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]  # token t is predicted at position t - 1
            token = ids[position]
            wanted = [token]
            if top_k == -1:
                wanted += list(range(row.shape[0]))
            elif top_k > 0:
                wanted += row.topk(top_k).indices.tolist()
            entry = {}
            for token_id in wanted:
                value = row[token_id].item()
                rank = int((row > value).sum().item()) + 1
                value = -9999.0 if value == float("-inf") else value  # vLLM's clamp
                entry.setdefault(
                    str(token_id), {"logprob": value, "rank": rank, "decoded_token": decode([token_id])}
                )
            entries.append(entry)
        content = decode([int(logprobs[-1].argmax())], skip_special_tokens=True)
        return len(ids), entries, content

    def _chat_request(self, body: dict) -> tuple[Conversation, bool, bool]:
        generation_prompt = bool(body.get("add_generation_prompt", True))
        continue_final = bool(body.get("continue_final_message", False))
        if generation_prompt and continue_final:
            raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("`messages` must be a non-empty list")
        conversation = Conversation()
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if role not in ("user", "assistant"):
                raise BadRequest(f"the test server takes user and assistant messages, not {role!r}")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            images = [load_image(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url"]
            text = "".join(p["text"] for p in parts if p.get("type") == "text")
            conversation = conversation.user(text, images) if role == "user" else conversation.assistant(text)
        if continue_final and conversation.turns[-1].role != "assistant":
            raise BadRequest("continue_final_message needs a final assistant message")
        return conversation, generation_prompt, continue_final

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"The model `{model}` does not exist.", HTTPStatus.NOT_FOUND)

    def _max_model_len(self) -> int:
        config = self.backend.model.config
        return int(getattr(config.get_text_config(), "max_position_embeddings", 2048))


class Batcher:
    """The model's one worker for a batching server: generations that arrive together go together.

    Each round takes the jobs queued within `window` seconds of the first: the generations are
    decoded side by side by `generate_many` (the fast path), any other model work runs alone. All
    of it runs in one backend session, so images and computed prefixes are reused between
    requests; the session is renewed after `cache_tokens` tokens (a bounded prefix cache).
    `worked(seconds, generations)` is told what each round cost.
    """

    def __init__(
        self,
        backend: HFBackend,
        worked: Callable[[float, int], None],
        window: float,
        cache_tokens: int = 1000,
    ) -> None:
        self.backend = backend
        self.window = window
        self.cache_tokens = cache_tokens
        self._worked = worked
        self._jobs: SimpleQueue[tuple[Request | Callable[[], object], Future] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def run(self, job: Callable[[], T]) -> T:
        """Run `job` on the worker, alone, and return what it returns."""
        return self._submit(job)

    def generate(self, request: Request) -> Reply:
        """The request's greedy reply, decoded together with any that arrived with it."""
        return self._submit(request)

    def _submit(self, job: Request | Callable[[], object]) -> Any:  # a Reply, or what the job returns
        future: Future = Future()
        self._jobs.put((job, future))
        return future.result()

    def _loop(self) -> None:
        with ExitStack() as session:
            session.enter_context(self.backend.session())
            running = True
            while running:
                batch, running = self._gather()
                start = time.perf_counter()
                self._round(batch)
                self._worked(time.perf_counter() - start, sum(isinstance(j, Request) for j, _ in batch))
                if self.backend.tokens_computed > self.cache_tokens:
                    session.close()
                    session.enter_context(self.backend.session())

    def _gather(self) -> tuple[list[tuple[Request | Callable[[], object], Future]], bool]:
        """The jobs of one round, and False when the server is stopping."""
        first = self._jobs.get()
        if first is None:
            return [], False
        batch, deadline = [first], time.perf_counter() + self.window
        while (left := deadline - time.perf_counter()) > 0:
            try:
                item = self._jobs.get(timeout=left)
            except Empty:
                break
            if item is None:
                return batch, False
            batch.append(item)
        return batch, True

    def _round(self, batch: list[tuple[Request | Callable[[], object], Future]]) -> None:
        generations = [(job, future) for job, future in batch if isinstance(job, Request)]
        for job, future in batch:
            if not isinstance(job, Request):
                _settle(future, job)
        if generations:
            _settle_many([f for _, f in generations], lambda: self._replies([j for j, _ in generations]))

    def _replies(self, requests: list[Request]) -> list[Reply]:
        """Replies as `OpenAITestServer._generate` gives them, from one `generate_many` call."""
        backend, tokenizer = self.backend, self.backend.tokenizer
        replies = []
        for request, generation in zip(requests, backend.generate_many(requests), strict=True):
            conversation = request.conversation
            text = backend.render(conversation, add_generation_prompt=True)
            prompt_tokens = len(backend.encode([text], conversation.images)["input_ids"][0])
            values = list(generation.token_logprobs or ())
            ids = tokenizer(generation.text, add_special_tokens=False)["input_ids"]
            tokens = [tokenizer.decode([i]) for i in ids] if len(ids) == len(values) else [""] * len(values)
            replies.append((prompt_tokens, generation.text, list(zip(tokens, values, strict=True))))
        return replies


def _settle(future: Future, job: Callable[[], object]) -> None:
    try:
        future.set_result(job())
    except BaseException as error:  # the request's thread raises it
        future.set_exception(error)


def _settle_many(futures: list[Future], job: Callable[[], list]) -> None:
    try:
        for future, value in zip(futures, job(), strict=True):
            future.set_result(value)
    except BaseException as error:
        for future in futures:
            if not future.done():
                future.set_exception(error)


def _now() -> str:
    """The time as Ollama writes it (RFC 3339, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"


def _ollama_logprob(token: str, value: float) -> dict:
    """One entry of Ollama's ``logprobs`` list."""
    return {"token": token, "logprob": value, "bytes": list(token.encode())}


def _token_logprob(token: str, value: float) -> dict:
    """One entry of ``logprobs.content``, as OpenAI writes it."""
    return {"token": token, "logprob": value, "bytes": list(token.encode()), "top_logprobs": []}


def _handler(server: OpenAITestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM (uvicorn) serves

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()  # small writes go out at once, as from a real server (no Nagle stalls)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _authorized(self) -> bool:
            if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                return True
            self._error(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided")
            return False

        def do_GET(self) -> None:
            routes = {"/v1/models": server.models}
            if server.profile == "ollama":
                routes |= {"/api/tags": server.ollama_tags, "/api/version": lambda: {"version": "0.13.0"}}
            if self.path not in routes:
                self._error(HTTPStatus.NOT_FOUND, "Not Found")
                return
            server._admit(self.path, {})
            time.sleep(server.delay)
            server._done()
            if self._authorized():
                self._send(HTTPStatus.OK, routes[self.path]())

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
                return
            routes = {"/v1/chat/completions": server.chat_completions, "/tokenize": server.tokenize}
            if server.profile == "ollama":
                routes["/api/chat"] = server.ollama_chat
            if self.path not in routes:
                self._error(HTTPStatus.NOT_FOUND, "Not Found")
                return
            fault = server._admit(self.path, body)
            try:
                self._answer(fault, routes[self.path], body)
            finally:
                server._done()

        def _answer(self, fault: str | None, route, body: dict) -> None:
            time.sleep(server.delay)
            if not self._authorized():
                return
            if fault == "503":
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "injected fault: service unavailable")
                return
            if fault == "timeout":
                server._stopped.wait(60)  # no answer; the client gives up first
                self.close_connection = True
                return
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            try:
                payload = route(body)
            except BadRequest as err:
                self._error(err.status, str(err))
                return
            if isinstance(payload, list) and self.path.startswith("/api/"):
                self._stream_lines(payload)
            elif isinstance(payload, list):
                self._stream(payload)
            else:
                self._send(HTTPStatus.OK, payload)

        def _stream(self, chunks: list[dict]) -> None:
            """Server-sent events, ending with ``data: [DONE]``."""
            events = [*(json.dumps(c) for c in chunks), "[DONE]"]
            self._chunked("text/event-stream", [f"data: {event}\n\n" for event in events])

        def _stream_lines(self, lines: list[dict]) -> None:
            """Ollama's stream: one JSON object per line."""
            self._chunked("application/x-ndjson", [json.dumps(line) + "\n" for line in lines])

        def _chunked(self, content_type: str, pieces: list[str]) -> None:
            """The pieces in chunked transfer encoding, each written as it would be produced."""
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in pieces:
                data = piece.encode()
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def _error(self, status: HTTPStatus, message: str) -> None:
            if self.path.startswith("/api/"):  # Ollama's native API: a bare message
                self._send(status, {"error": message})
                return
            error = {
                "message": message,
                "type": status.phrase.replace(" ", ""),
                "param": None,
                "code": status.value,
            }
            self._send(status, {"error": error})

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


VLLMTestServer = OpenAITestServer  # the name other tests know it by (profile "vllm" by default)

__all__ = ["FAULTS", "PROFILES", "Batcher", "OpenAITestServer", "Profile", "Record", "VLLMTestServer"]


def main(argv: list[str] | None = None) -> None:
    """Serve the shipped model on 127.0.0.1 until interrupted (for bench/ and manual runs)."""
    import argparse

    parser = argparse.ArgumentParser(description="The OpenAI-compatible test server, standalone.")
    parser.add_argument("--profile", choices=PROFILES, default="vllm")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds slept before each answer")
    parser.add_argument("--batching", action="store_true", help="decode concurrent requests together")
    args = parser.parse_args(argv)
    from df_agent.backends.hf import shipped_model_path

    backend = HFBackend.from_pretrained(shipped_model_path(), device="cpu")
    server = OpenAITestServer(
        backend, profile=args.profile, delay=args.delay, batching=args.batching, port=args.port
    )
    with server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
