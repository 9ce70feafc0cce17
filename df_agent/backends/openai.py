"""The OpenAI-compatible server backend: any vLLM (or compatible) server over HTTP.

`generate` is one chat completion at temperature 0 with the images as base64 PNG data URLs.
`score` reads vLLM's prompt log-probabilities: each candidate is appended as the final assistant
message (``continue_final_message``) and the server returns the log-probability of every prompt
token; the candidate's tokens are the ones past the generation prompt, found with vLLM's
``/tokenize`` endpoint (which renders chat messages like the chat endpoint does). One request per
candidate, sent concurrently. Transient failures (timeouts, dropped connections, 429, 5xx) are
retried with exponential backoff; a server that cannot return prompt log-probabilities raises
`ScoringUnavailableError`, and the engine then reports that no vote was possible.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from df_agent.backends.base import Conversation, ScoringUnavailableError
from df_agent.boxes import BoxConvention
from df_agent.images import to_data_uri

try:
    import httpx
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError("OpenAIBackend needs httpx: pip install 'df-agent[openai]'") from err

logger = logging.getLogger(__name__)

InputSize = tuple[int, int] | Callable[[Image.Image], tuple[int, int]]
CHAT_PATH = "/v1/chat/completions"
TOKENIZE_PATH = "/tokenize"
MODELS_PATH = "/v1/models"


class ServerError(RuntimeError):
    """The server refused a request, or kept failing after every retry.

    Attributes:
        status: The HTTP status of the last answer, or None when no answer came back.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _transient_status(status: int) -> bool:
    return status == 429 or status >= 500


def _is_transient(error: BaseException) -> bool:
    """Timeouts, connection errors, 429 and 5xx: worth another try."""
    if isinstance(error, httpx.HTTPStatusError):
        return _transient_status(error.response.status_code)
    return isinstance(error, httpx.TransportError)


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


class OpenAIBackend:
    """A model served by an OpenAI-compatible server (vLLM's ``vllm serve``) over HTTP.

    Thread-safe: one pooled `httpx.Client` serves every thread, so an evaluation harness can
    run several questions at once (``workers``). With several base URLs (replicas of the same
    model), requests go round-robin, and a retry goes to the next replica. Retrying is safe:
    every request is greedy, so a repeated one gets the same answer.

    Args:
        base_url: The server, e.g. ``http://gpu1:8000/v1`` (with or without ``/v1``), or a list
            of replicas serving the same model.
        model: The served model name; default the first one the server lists at ``/v1/models``.
        api_key: Sent as a bearer token (``vllm serve --api-key``).
        box_convention: How the served model writes boxes (default fractions, as DualFocus).
        prompt_family: The prompt set in ``prompts/`` the model was trained with.
        input_size: The (width, height) the server's image processor resizes images to, or a
            function of the image; default the image's own size (right for fraction boxes).
        timeout: Seconds to wait for one answer (a long generation needs time).
        max_attempts: Tries per request, the first included, before giving up.
        backoff: First wait between tries, in seconds; it doubles each time.
        max_backoff: Longest wait between tries.
        max_connections: Size of the connection pool shared by all threads.
        client: An `httpx.Client` to use instead of a new one (proxies, TLS, transports); it then
            carries its own headers and timeouts, and `close` closes it.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str | None = None,
        *,
        api_key: str | None = None,
        box_convention: BoxConvention | str = BoxConvention.FRACTION,
        prompt_family: str = "dualfocus",
        input_size: InputSize | None = None,
        timeout: float = 300.0,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_connections: int = 64,
        client: httpx.Client | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url needs at least one URL")
        if max_attempts < 1 or backoff < 0 or timeout <= 0:
            raise ValueError("max_attempts must be >= 1, backoff >= 0 and timeout > 0")
        self.roots = [server_root(url) for url in urls]
        self.box_convention = BoxConvention(box_convention)
        self.prompt_family = prompt_family
        self._input_size = input_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers=headers,
        )
        self._next = itertools.cycle(self.roots)
        self._next_lock = threading.Lock()
        self.model_id = model or self._served_model()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- HTTP ----------------------------------------------------------------------------------

    def _root(self) -> str:
        with self._next_lock:
            return next(self._next)

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        """One JSON request with retries on transient failures; the answer's JSON body."""
        retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential(multiplier=self.backoff, max=self.max_backoff),
            before_sleep=lambda state: _log_retry(state, method, path),
            reraise=True,
        )
        url = path
        try:
            for attempt in retrying:
                with attempt:
                    url = self._root() + path
                    response = self._client.request(method, url, json=payload)
                    response.raise_for_status()
        except httpx.HTTPStatusError as err:
            status = err.response.status_code
            tries = f" after {self.max_attempts} attempts" if _is_transient(err) else ""
            raise ServerError(
                f"{method} {url} answered {status}{tries}: {_server_message(err.response)}", status
            ) from err
        except httpx.TransportError as err:
            raise ServerError(
                f"{method} {url} failed after {self.max_attempts} attempts: {type(err).__name__}: {err}"
            ) from err
        try:
            body = response.json()
        except ValueError as err:
            raise ServerError(f"{method} {url} answered with something that is not JSON") from err
        if not isinstance(body, dict):
            raise ServerError(f"{method} {url} answered with JSON that is not an object")
        return body

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
        assistant turn is its text.
        """
        uris: dict[int, str] = {}  # an image shown twice is encoded once
        messages: list[dict] = []
        for turn in conversation.turns:
            if turn.role == "assistant":
                messages.append({"role": "assistant", "content": turn.text})
                continue
            content = [
                {"type": "image_url", "image_url": {"url": uris.setdefault(id(image), to_data_uri(image))}}
                for image in turn.images
            ]
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": "user", "content": content})
        return messages

    # -- the two verbs -------------------------------------------------------------------------

    def generate(self, conversation: Conversation, max_new_tokens: int = 128) -> str:
        """Greedy reply (temperature 0) to a conversation that ends with a user turn."""
        if not conversation.turns or conversation.turns[-1].role != "user":
            raise ValueError("generate needs a conversation that ends with a user turn")
        body = self._request(
            "POST",
            CHAT_PATH,
            {
                "model": self.model_id,
                "messages": self.messages(conversation),
                "max_tokens": max_new_tokens,
                "temperature": 0.0,
                "n": 1,
            },
        )
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise ServerError(f"a chat completion has no choices[0].message: {str(body)[:200]}") from err
        return (content or "").strip()

    def score(self, conversation: Conversation, candidates: Sequence[str]) -> list[float]:
        """Mean negative log-likelihood of each candidate's tokens as the reply (lower is better).

        One request per candidate (vLLM returns prompt log-probabilities per request), sent
        concurrently; plus one ``/tokenize`` request for the prompt and one per candidate, which
        locate the candidate's tokens.

        Raises:
            ScoringUnavailableError: The server returns no prompt log-probabilities, has no
                ``/tokenize`` endpoint, refuses the request, or its chat template does not render
                the prompt as a prefix of prompt + candidate.
        """
        if not candidates:
            return []
        if any(not isinstance(c, str) or not c.strip() for c in candidates):
            raise ValueError("candidates must be non-empty strings")
        messages = self.messages(conversation)
        prompt_ids = self._tokens({"messages": messages, "add_generation_prompt": True})
        with ThreadPoolExecutor(max_workers=len(candidates)) as pool:
            return list(pool.map(lambda c: self._score_one(messages, prompt_ids, c), candidates))

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

    def _score_one(self, messages: list[dict], prompt_ids: list[int], candidate: str) -> float:
        full = [*messages, {"role": "assistant", "content": candidate}]
        full_ids = self._tokens(
            {"messages": full, "add_generation_prompt": False, "continue_final_message": True}
        )
        start = len(prompt_ids)
        if len(full_ids) <= start or full_ids[:start] != prompt_ids:
            raise ScoringUnavailableError(
                f"the server's chat template does not render the prompt as a prefix of prompt + reply "
                f"for {candidate!r}; the reply cannot be scored separately"
            )
        candidate_ids = full_ids[start:]
        try:
            body = self._request(
                "POST",
                CHAT_PATH,
                {
                    "model": self.model_id,
                    "messages": full,
                    "add_generation_prompt": False,
                    "continue_final_message": True,
                    "prompt_logprobs": 1,
                    "max_tokens": 1,
                    "temperature": 0.0,
                },
            )
        except ServerError as err:
            if not _refused(err):
                raise
            raise ScoringUnavailableError(
                f"the server refused a prompt log-probabilities request: {err}"
            ) from err
        entries = body.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) <= len(candidate_ids):
            raise ScoringUnavailableError(
                "the server returned no prompt log-probabilities ('prompt_logprobs'); scoring needs "
                "vLLM's OpenAI-compatible server (or one with the same extension)"
            )
        logprobs = []
        for token_id, entry in zip(candidate_ids, entries[-len(candidate_ids) :], strict=True):
            record = entry.get(str(token_id)) if isinstance(entry, dict) else None
            if not isinstance(record, dict) or "logprob" not in record:
                raise ScoringUnavailableError(
                    f"the prompt log-probabilities do not cover token {token_id} of {candidate!r}: "
                    "the chat endpoint and /tokenize disagree on the tokens"
                )
            logprobs.append(float(record["logprob"]))
        return -sum(logprobs) / len(logprobs)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) the server's processor resizes `image` to (see `input_size=`)."""
        if self._input_size is None:
            return image.size
        if callable(self._input_size):
            return self._input_size(image)
        return self._input_size


__all__ = ["OpenAIBackend", "ServerError", "server_root"]
