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

Every profile streams (``stream: true``, server-sent events) and takes an optional bearer key.
`delay` seconds are slept before each answer, outside the model lock: a simulated network round
trip, so concurrent requests overlap it. Faults can be scheduled on the n-th request to a path:
"503" (an error answer), "timeout" (no answer until the server stops) and "drop" (the connection
closed without an answer). Every request is recorded with the fault it got, so tests count what
reached the server.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import torch

from df_agent.backends.base import Conversation
from df_agent.backends.hf import HFBackend
from df_agent.images import load_image

FAULTS = ("503", "timeout", "drop")
PROFILES = ("vllm", "hosted", "bare")
Profile = Literal["vllm", "hosted", "bare"]
VLLM_ONLY_FIELDS = ("prompt_logprobs", "add_generation_prompt", "continue_final_message")


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
        self._faults: dict[tuple[str, int], str] = {}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()  # requests, faults and counters
        self._model_lock = threading.Lock()  # one request at the model at a time
        self._stopped = threading.Event()
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
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> OpenAITestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._http.shutdown()
        self._http.server_close()

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
        ids = self.backend.encode([text], conversation.images)["input_ids"][0].tolist()
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
            prompt_ids, prompt_logprobs, content = self._prompt_logprobs(text, conversation, top_k)
        elif continue_final or not generation_prompt:
            raise BadRequest("the test server generates only after a generation prompt")
        else:
            prompt_ids, content, token_logprobs = self._generate(conversation, max_tokens)
            prompt_logprobs = None
        completion_tokens = len(self.backend.tokenizer(content, add_special_tokens=False)["input_ids"])
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
                "prompt_tokens": len(prompt_ids),
                "total_tokens": len(prompt_ids) + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            },
            **(vllm_fields if self.profile == "vllm" else {}),
        }

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

    def _generate(self, conversation: Conversation, max_tokens: int) -> tuple:
        """Greedy reply, its prompt ids, and each reply token with its log-probability."""
        text = self.backend.render(conversation, add_generation_prompt=True)
        tokenizer = self.backend.tokenizer
        with torch.inference_mode():
            inputs = self.backend.encode([text], conversation.images)
            output = self.backend.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
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
        return prompt_ids, content, token_logprobs

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
        return ids, entries, content

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
            if self.path != "/v1/models":
                self._error(HTTPStatus.NOT_FOUND, "Not Found")
                return
            server._admit(self.path, {})
            time.sleep(server.delay)
            server._done()
            if self._authorized():
                self._send(HTTPStatus.OK, server.models())

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
                return
            routes = {"/v1/chat/completions": server.chat_completions, "/tokenize": server.tokenize}
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
                with server._model_lock:
                    start = time.perf_counter()
                    try:
                        payload = route(body)
                    finally:
                        server.busy_s += time.perf_counter() - start
            except BadRequest as err:
                self._error(err.status, str(err))
                return
            if isinstance(payload, list):
                self._stream(payload)
            else:
                self._send(HTTPStatus.OK, payload)

        def _stream(self, chunks: list[dict]) -> None:
            """Server-sent events in chunked transfer encoding, ending with ``data: [DONE]``."""
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in [*(json.dumps(c) for c in chunks), "[DONE]"]:
                data = f"data: {event}\n\n".encode()
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def _error(self, status: HTTPStatus, message: str) -> None:
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

__all__ = ["FAULTS", "PROFILES", "OpenAITestServer", "Profile", "Record", "VLLMTestServer"]


def main(argv: list[str] | None = None) -> None:
    """Serve the shipped model on 127.0.0.1 until interrupted (for bench/ and manual runs)."""
    import argparse

    parser = argparse.ArgumentParser(description="The OpenAI-compatible test server, standalone.")
    parser.add_argument("--profile", choices=PROFILES, default="vllm")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds slept before each answer")
    args = parser.parse_args(argv)
    from df_agent.backends.hf import shipped_model_path

    backend = HFBackend.from_pretrained(shipped_model_path(), device="cpu")
    server = OpenAITestServer(backend, profile=args.profile, delay=args.delay, port=args.port)
    with server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
