"""A test server that speaks the subset of vLLM's OpenAI-compatible API that `OpenAIBackend` uses.

It is backed by an `HFBackend` and answers, in vLLM's JSON shapes:
- ``GET /v1/models``: the one served model;
- ``POST /tokenize`` with chat ``messages``: the token ids of the rendered chat (images expanded);
- ``POST /v1/chat/completions``: a greedy reply, or with ``prompt_logprobs=k`` vLLM's top-level
  ``prompt_logprobs`` list (``None`` for the first token, then per token a dict from token id, as a
  string, to ``{"logprob", "rank", "decoded_token"}``, holding the prompt's own token and the top k).

Faults can be scheduled on the n-th request to a path: "503" (an error answer), "timeout" (no
answer until the server stops) and "drop" (the connection closed without an answer). Every
request is recorded with the fault it got, so tests count what reached the server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from df_agent.backends.base import Conversation
from df_agent.backends.hf import HFBackend
from df_agent.images import load_image

FAULTS = ("503", "timeout", "drop")


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


class VLLMTestServer:
    """An in-process HTTP server on a free loopback port, in a thread.

    Args:
        backend: The model that answers.
        model_name: The name it is served under.
        prompt_logprobs: False makes it behave like a server without vLLM's extension: the
            field is ignored and ``/tokenize`` does not exist (404).
    """

    def __init__(
        self, backend: HFBackend, model_name: str = "df-test", *, prompt_logprobs: bool = True
    ) -> None:
        self.backend = backend
        self.model_name = model_name
        self.prompt_logprobs = prompt_logprobs
        self.records: list[Record] = []
        self._faults: dict[tuple[str, int], str] = {}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()  # requests, faults and counters
        self._model_lock = threading.Lock()  # one request at the model at a time
        self._stopped = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL, OpenAI style (``http://127.0.0.1:PORT/v1``)."""
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> VLLMTestServer:
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
            self._faults.clear()
            self._seen.clear()

    def _admit(self, path: str, body: dict) -> str | None:
        """Record a request and return the fault scheduled for it, if any."""
        with self._lock:
            index = self._seen.get(path, 0)
            self._seen[path] = index + 1
            fault = self._faults.pop((path, index), None)
            self.records.append(Record(path, fault, body))
            return fault

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
        if not self.prompt_logprobs:
            raise BadRequest("Not Found", HTTPStatus.NOT_FOUND)
        self._check_model(body)
        conversation, generation_prompt, continue_final = self._chat_request(body)
        text = self.backend.render(
            conversation, add_generation_prompt=generation_prompt, continue_final=continue_final
        )
        ids = self.backend.encode([text], conversation.images)["input_ids"][0].tolist()
        return {"count": len(ids), "max_model_len": self._max_model_len(), "tokens": ids, "token_strs": None}

    def chat_completions(self, body: dict) -> dict:
        self._check_model(body)
        if body.get("stream"):
            raise BadRequest("the test server does not stream")
        conversation, generation_prompt, continue_final = self._chat_request(body)
        max_tokens = int(body.get("max_tokens") or 16)
        top_k = body.get("prompt_logprobs") if self.prompt_logprobs else None
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
            content = self.backend.generate(conversation, max_new_tokens=max_tokens)
            text = self.backend.render(conversation, add_generation_prompt=True)
            prompt_ids = self.backend.encode([text], conversation.images)["input_ids"][0].tolist()
            prompt_logprobs = None
        completion_tokens = len(self.backend.tokenizer(content, add_special_tokens=False)["input_ids"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "length" if completion_tokens >= max_tokens else "stop",
                    "stop_reason": None,
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "total_tokens": len(prompt_ids) + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            },
            "prompt_logprobs": prompt_logprobs,
            "kv_transfer_params": None,
        }

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


def _handler(server: VLLMTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM (uvicorn) serves

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self._error(HTTPStatus.NOT_FOUND, "Not Found")
                return
            server._admit(self.path, {})
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
                    payload = routes[self.path](body)
                self._send(HTTPStatus.OK, payload)
            except BadRequest as err:
                self._error(err.status, str(err))

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


__all__ = ["FAULTS", "Record", "VLLMTestServer"]
