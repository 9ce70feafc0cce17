"""The OpenAI-compatible server backend: vLLM, a hosted chat API, Ollama, llama.cpp, LM Studio...

A server offers one of three things, and the backend detects which once (or is told, with
``capabilities=``), then declares it in `abilities`:

- ``"vllm"``: prompt log-probabilities and ``/tokenize`` (vLLM, SGLang with the same extension).
  `score` works, so every vote can run; generations also carry their token log-probabilities.
- ``"hosted"``: chat completions that return the generated tokens' ``logprobs`` (the OpenAI API,
  Ollama's ``/v1`` in recent releases, llama.cpp's server): the own-context vote, from the
  generations themselves, at no extra request.
- ``"bare"``: chat completions only: the engine's declared policy for backends without a vote.

`generate_many` sends independent requests concurrently (threads over one pooled `httpx.Client`)
and streams each reply, so a server that accepts a request and then sends nothing fails after
``first_byte_timeout`` seconds instead of the whole generation timeout. Transient failures
(connection errors, dropped connections, 429, 5xx) are retried with exponential backoff, each retry
and its wait logged; a silent server is not retried (another wait would only double the silence).

`score` reads vLLM's prompt log-probabilities: each candidate is appended as the final assistant
message (``continue_final_message``) and the server returns the log-probability of every prompt
token, the token's own first; the candidate's tokens are those past the generation prompt, whose
length one ``/tokenize`` request gives. All of it goes out at once: one round trip per vote.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from df_agent.backends._images import png_data_uri
from df_agent.backends.base import (
    Abilities,
    Backend,
    Conversation,
    Generation,
    Request,
    ScoringUnavailableError,
    read_token_logprobs,
)
from df_agent.backends.presets import Capabilities, InputSize, preset_for, resolve_input_size
from df_agent.backends.text_safety import REMOTE_GUARD
from df_agent.boxes import BoxConvention

try:
    import httpx
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError("OpenAIBackend needs httpx: pip install 'df-agent[openai]'") from err

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
TOKENIZE_PATH = "/tokenize"
MODELS_PATH = "/v1/models"
OPENAI_URL = "https://api.openai.com/v1"
CAPABILITIES: tuple[Capabilities, ...] = ("vllm", "hosted", "bare")
_PROBE = [{"role": "user", "content": "Say OK."}]


class ServerError(RuntimeError):
    """The server refused a request, kept failing after every retry, or went silent.

    Attributes:
        status: The HTTP status of the last answer, or None when no answer came back.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _transient_status(status: int) -> bool:
    return status == 429 or status >= 500


def _is_transient(error: BaseException) -> bool:
    """Connection errors, dropped connections, 429 and 5xx: worth another try (not a silent server)."""
    if isinstance(error, httpx.HTTPStatusError):
        return _transient_status(error.response.status_code)
    return isinstance(error, httpx.TransportError) and not isinstance(error, httpx.ReadTimeout)


def _refused(error: ServerError) -> bool:
    """The server answered and refused the request itself (a 4xx other than 429)."""
    return error.status is not None and not _transient_status(error.status)


def _server_message(response: httpx.Response) -> str:
    """The error message in a server's answer (OpenAI / vLLM / FastAPI shapes), else its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])
    return str(body)[:300]


def _log_retry(state: RetryCallState, method: str, path: str) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.warning(
        "%s %s failed (attempt %d: %s: %s); retrying in %.2f s",
        method, path, state.attempt_number, type(error).__name__, error, wait,
    )  # fmt: skip


def server_root(url: str) -> str:
    """The server's root URL: `url` without a trailing slash or ``/v1`` (both forms are accepted)."""
    root = url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, not {url!r}")
    return root.removesuffix("/v1")


class OpenAIBackend(Backend):
    """A model behind an OpenAI-compatible chat completions API.

    Thread-safe: one pooled `httpx.Client` serves every thread, so an evaluation harness can run
    several questions at once (``workers``). With several base URLs (replicas of the same model),
    requests go round-robin, and a retry goes to the next replica. Retrying is safe: every
    request is greedy (temperature 0).

    >>> backend = OpenAIBackend(model="gpt-4o-mini")  # doctest: +SKIP  (OPENAI_API_KEY)
    >>> backend = OpenAIBackend("http://localhost:11434/v1", "qwen2.5vl:7b")  # doctest: +SKIP  (Ollama)
    >>> backend = OpenAIBackend("http://gpu1:8000/v1")  # doctest: +SKIP  (vllm serve; model listed)

    Args:
        base_url: The server, e.g. ``http://gpu1:8000/v1`` (with or without ``/v1``), or a list of
            replicas; default ``OPENAI_BASE_URL``, else the OpenAI API.
        model: The served model name; default the first one the server lists at ``/v1/models``.
        api_key: Sent as a bearer token; default ``OPENAI_API_KEY`` (none if unset).
        capabilities: "vllm", "hosted" or "bare" (see the module docstring); default the model's
            preset where it says, else detected from the server on first use (up to three tiny
            text-only requests, once).
        box_convention: How the model writes boxes; default from its preset
            (`df_agent.backends.presets`).
        prompt_family: The prompt set in ``prompts/``; default from its preset.
        input_size: The (width, height) the server's image processor resizes images to, or a
            function of the image; default from the preset, else the image's own size.
        timeout: Seconds one generation may take in all.
        connect_timeout: Seconds to wait for a connection.
        first_byte_timeout: Seconds to wait for the first byte of an answer (and between the
            chunks of a streamed one) before giving up on a silent server.
        max_attempts: Tries per request, the first included, before giving up.
        backoff: First wait between tries, in seconds; it doubles each time.
        max_backoff: Longest wait between tries.
        max_connections: Size of the connection pool shared by all threads.
        client: An `httpx.Client` to use instead of a new one (proxies, TLS, transports); it then
            carries its own headers and timeouts, and `close` closes it.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        capabilities: Capabilities | None = None,
        box_convention: BoxConvention | str | None = None,
        prompt_family: str | None = None,
        input_size: InputSize | None = None,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        first_byte_timeout: float = 120.0,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_connections: int = 64,
        client: httpx.Client | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url needs at least one URL")
        if max_attempts < 1 or backoff < 0 or min(timeout, connect_timeout, first_byte_timeout) <= 0:
            raise ValueError("max_attempts must be >= 1, backoff >= 0 and every timeout > 0")
        if capabilities is not None and capabilities not in CAPABILITIES:
            raise ValueError(f"capabilities must be one of {CAPABILITIES} or None, not {capabilities!r}")
        self.roots = [server_root(url) for url in urls]
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.first_byte_timeout = first_byte_timeout
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(
                connect=connect_timeout, read=first_byte_timeout, write=first_byte_timeout, pool=timeout
            ),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers=headers,
        )
        self._next = itertools.cycle(self.roots)
        self._next_lock = threading.Lock()
        self.model_id = model or self._served_model()
        self.preset = preset_for(
            self.model_id, box_convention=box_convention, prompt_family=prompt_family, input_size=input_size
        )
        self.box_convention = self.preset.box_convention
        self.prompt_family = self.preset.prompt_family
        self._input_size = self.preset.input_size
        self._capabilities = capabilities or self.preset.capabilities
        self._detect_lock = threading.Lock()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the server offers ----------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """ "vllm", "hosted" or "bare": as told, else detected from the server once."""
        if self._capabilities is None:
            with self._detect_lock:
                if self._capabilities is None:
                    self._capabilities = self._detect()
                    logger.info("%s at %s offers %r", self.model_id, self.roots[0], self._capabilities)
        return self._capabilities

    @property
    def abilities(self) -> Abilities:
        """Prompt log-probabilities for "vllm", generation log-probabilities for "vllm" and "hosted"."""
        capabilities = self.capabilities
        return Abilities(
            prompt_logprobs=capabilities == "vllm", generation_logprobs=capabilities in ("vllm", "hosted")
        )

    def _detect(self) -> Capabilities:
        """Probe with tiny text-only requests: /tokenize + prompt_logprobs, then generation logprobs."""
        probe = {"model": self.model_id, "messages": _PROBE, "max_tokens": 1, "temperature": 0.0}
        try:
            tokens = self._request("POST", TOKENIZE_PATH, {"model": self.model_id, "messages": _PROBE})
            body = self._request("POST", CHAT_PATH, {**probe, "prompt_logprobs": 0})
            if isinstance(tokens.get("tokens"), list) and isinstance(body.get("prompt_logprobs"), list):
                return "vllm"
        except ServerError as err:
            if not _refused(err):
                raise
        try:
            body = self._request("POST", CHAT_PATH, {**probe, "logprobs": True})
        except ServerError as err:
            if not _refused(err):
                raise
            return "bare"
        return "hosted" if _token_logprobs(_first_choice(body)) is not None else "bare"

    # -- HTTP ----------------------------------------------------------------------------------

    def _root(self) -> str:
        with self._next_lock:
            return next(self._next)

    def _retrying(self, method: str, path: str) -> Retrying:
        return Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
            before_sleep=lambda state: _log_retry(state, method, path),
            reraise=True,
        )

    def _failure(self, method: str, url: str, err: httpx.HTTPError) -> ServerError:
        """The clear error for a request that failed for good."""
        if isinstance(err, httpx.HTTPStatusError):
            status = err.response.status_code
            tries = f" after {self.max_attempts} attempts" if _is_transient(err) else ""
            return ServerError(
                f"{method} {url} answered {status}{tries}: {_server_message(err.response)}", status
            )
        if isinstance(err, httpx.ReadTimeout):
            return ServerError(
                f"{method} {url}: the server accepted the request but sent nothing for "
                f"{self.first_byte_timeout:g} s (first_byte_timeout); it is overloaded or stuck"
            )
        return ServerError(
            f"{method} {url} failed after {self.max_attempts} attempts: {type(err).__name__}: {err}"
        )

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        """One JSON request with retries on transient failures; the answer's JSON body."""
        url = path
        try:
            for attempt in self._retrying(method, path):
                with attempt:
                    url = self._root() + path
                    response = self._client.request(method, url, json=payload)
                    if response.status_code >= 400:
                        response.read()
                    response.raise_for_status()
        except httpx.HTTPError as err:
            raise self._failure(method, url, err) from err
        try:
            body = response.json()
        except ValueError as err:
            raise ServerError(f"{method} {url} answered with something that is not JSON") from err
        if not isinstance(body, dict):
            raise ServerError(f"{method} {url} answered with JSON that is not an object")
        return body

    def _stream_chat(self, payload: dict) -> tuple[str, tuple[float, ...] | None]:
        """A streamed chat completion with retries: the reply's text and its token log-probabilities."""
        url = CHAT_PATH
        try:
            for attempt in self._retrying("POST", CHAT_PATH):
                with attempt:
                    url = self._root() + CHAT_PATH
                    with self._client.stream("POST", url, json={**payload, "stream": True}) as response:
                        if response.status_code >= 400:
                            response.read()
                        response.raise_for_status()
                        return self._read_events(response, url)
        except httpx.HTTPError as err:
            raise self._failure("POST", url, err) from err
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _read_events(self, response: httpx.Response, url: str) -> tuple[str, tuple[float, ...] | None]:
        deadline = time.monotonic() + self.timeout
        text: list[str] = []
        logprobs: list[float] | None = None
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise ServerError(f"POST {url}: the reply took longer than {self.timeout:g} s (timeout)")
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError as err:
                raise ServerError(f"POST {url} streamed an event that is not JSON: {data[:200]}") from err
            if "error" in chunk:
                raise ServerError(f"POST {url} streamed an error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
                values = _token_logprobs(choice)
                if values is not None:
                    logprobs = (logprobs or []) + list(values)
        return "".join(text).strip(), tuple(logprobs) if logprobs is not None else None

    def _served_model(self) -> str:
        body = self._request("GET", MODELS_PATH)
        models = body.get("data") or []
        if not models or "id" not in models[0]:
            raise ServerError(f"{self.roots[0]}{MODELS_PATH} lists no model; pass model= explicitly")
        return str(models[0]["id"])

    # -- messages ------------------------------------------------------------------------------

    @staticmethod
    def messages(conversation: Conversation) -> list[dict]:
        """The conversation as OpenAI chat messages.

        Each user turn is its images (base64 PNG data URLs, in order) then its text; an
        assistant turn is its text. Texts are guarded (`REMOTE_GUARD`): the server's template
        never reads user text as its control tokens or role markers.
        """
        messages: list[dict] = []
        for turn in conversation.turns:
            if turn.role == "assistant":
                messages.append({"role": "assistant", "content": REMOTE_GUARD.literal(turn.text)})
                continue
            content = [
                {"type": "image_url", "image_url": {"url": png_data_uri(image)}} for image in turn.images
            ]
            content.append({"type": "text", "text": REMOTE_GUARD.plain(turn.text)})
            messages.append({"role": "user", "content": content})
        return messages

    # -- the two verbs -------------------------------------------------------------------------

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """Greedy reply (temperature 0) to a conversation that ends with a user turn."""
        return self.generate_many([Request(conversation, max_new_tokens)])[0].text

    def generate_many(self, requests: Sequence[Request]) -> list[Generation]:
        """Greedy replies to independent requests, sent concurrently, in order.

        Each `Generation` carries its tokens' log-probabilities when the server returns them
        (`abilities.generation_logprobs`).
        """
        for request in requests:
            turns = request.conversation.turns
            if not turns or turns[-1].role != "user":
                raise ValueError("generate needs a conversation that ends with a user turn")
        if not requests:
            return []
        logprobs = self.abilities.generation_logprobs

        payloads = [  # built here, so that an image shared by the requests is encoded once
            {
                "model": self.model_id,
                "messages": self.messages(request.conversation),
                "max_tokens": request.max_new_tokens,
                "temperature": 0.0,
                "n": 1,
                **({"logprobs": True} if logprobs else {}),
            }
            for request in requests
        ]

        def one(payload: dict) -> Generation:
            text, values = self._stream_chat(payload)
            return Generation(text, values if logprobs else None)

        if len(payloads) == 1:
            return [one(payloads[0])]
        with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
            return list(pool.map(one, payloads))

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """Mean negative log-likelihood of each candidate's tokens as the reply (lower is better).

        One prompt-log-probabilities request per candidate and one ``/tokenize`` request for the
        prompt, all sent at once.

        Raises:
            ScoringUnavailableError: The server offers no prompt log-probabilities (capabilities
                other than "vllm"), refuses the request, or its chat template does not render the
                prompt as a prefix of prompt + candidate.
        """
        if not candidates:
            return []
        if any(not isinstance(c, str) or not c.strip() for c in candidates):
            raise ValueError("candidates must be non-empty strings")
        if self.capabilities != "vllm":
            raise ScoringUnavailableError(
                f"the server offers no prompt log-probabilities (capabilities {self.capabilities!r}); "
                "scoring needs vLLM's OpenAI-compatible server (or one with the same extension)"
            )
        messages = self.messages(conversation)
        candidates = [REMOTE_GUARD.plain(c) for c in candidates]  # may be user text
        with ThreadPoolExecutor(max_workers=len(candidates) + 1) as pool:
            prompt = pool.submit(self._tokens, {"messages": messages, "add_generation_prompt": True})
            answers = [pool.submit(self._prompt_logprobs, messages, c) for c in candidates]
            prompt_ids = prompt.result()
            return [
                self._mean_nll(prompt_ids, a.result(), c) for a, c in zip(answers, candidates, strict=True)
            ]

    def _tokens(self, request: dict) -> list[int]:
        """Token ids of chat messages as the server's chat template and tokenizer render them."""
        try:
            body = self._request("POST", TOKENIZE_PATH, {"model": self.model_id, **request})
        except ServerError as err:
            if not _refused(err):
                raise
            raise ScoringUnavailableError(
                f"the server cannot tokenize chat messages, which scoring needs (vLLM's /tokenize): {err}"
            ) from err
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise ScoringUnavailableError(f"{TOKENIZE_PATH} answered without a 'tokens' list")
        return tokens

    def _prompt_logprobs(self, messages: list[dict], candidate: str) -> list:
        """vLLM's prompt log-probabilities of messages + candidate as the final assistant message."""
        payload = {
            "model": self.model_id,
            "messages": [*messages, {"role": "assistant", "content": candidate}],
            "add_generation_prompt": False,
            "continue_final_message": True,
            "prompt_logprobs": 0,
            "max_tokens": 1,
            "temperature": 0.0,
        }
        try:
            body = self._request("POST", CHAT_PATH, payload)
        except ServerError as err:
            if not _refused(err):
                raise
            raise ScoringUnavailableError(
                f"the server refused a prompt log-probabilities request: {err}"
            ) from err
        entries = body.get("prompt_logprobs")
        if not isinstance(entries, list):
            raise ScoringUnavailableError(
                "the server returned no prompt log-probabilities ('prompt_logprobs'); scoring needs "
                "vLLM's OpenAI-compatible server (or one with the same extension)"
            )
        return entries

    @staticmethod
    def _mean_nll(prompt_ids: list[int], entries: list, candidate: str) -> float:
        """The candidate's mean NLL from the entries past the prompt; each entry's first key is its token."""
        start = len(prompt_ids)
        tokens = []
        for entry in entries[1:]:
            if not isinstance(entry, dict) or not entry:
                raise ScoringUnavailableError("a prompt log-probabilities entry is empty")
            key, record = next(iter(entry.items()))
            if not isinstance(record, dict) or "logprob" not in record:
                raise ScoringUnavailableError(f"a prompt log-probabilities entry has no logprob: {entry}")
            tokens.append((int(key), float(record["logprob"])))
        if len(entries) <= start or [t for t, _ in tokens[: start - 1]] != prompt_ids[1:start]:
            raise ScoringUnavailableError(
                f"the server's chat template does not render the prompt as a prefix of prompt + reply "
                f"for {candidate!r}; the reply cannot be scored separately"
            )
        logprobs = [value for _, value in tokens[start - 1 :]]
        return -sum(logprobs) / len(logprobs)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the server's processor resizes `image` to (see `input_size=`)."""
        return resolve_input_size(self._input_size, image)


def _first_choice(body: dict) -> dict:
    choices = body.get("choices")
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}


def _token_logprobs(choice: dict) -> tuple[float, ...] | None:
    """``choice.logprobs.content[*].logprob`` (OpenAI's shape), or None when there are none."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice, dict) else None
    return read_token_logprobs(content)


__all__ = ["CAPABILITIES", "OPENAI_URL", "OpenAIBackend", "ServerError", "server_root"]
