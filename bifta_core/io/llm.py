"""A small OpenAI-compatible chat-completions client for generating class descriptions.

It speaks the ``POST {base_url}/chat/completions`` protocol that OpenAI, vLLM, Ollama, llama.cpp
and most hosted gateways implement, using only the standard library so that bifta gains no
dependency. What it adds over a bare HTTP call is what a run over hundreds of classes needs:

* per-request timeouts, and retries with exponential backoff and jitter on HTTP 429, 5xx,
  timeouts and connection errors (``Retry-After`` is honoured, up to a cap);
* a bounded number of retries for malformed answers (non-JSON body, no ``choices``);
* bounded concurrency (a thread pool of ``max_concurrency`` workers);
* a persistent on-disk cache, one JSON file per answer, so an interrupted or repeated run makes
  no request it has already made successfully;
* a circuit breaker that stops the run when the endpoint rejects the key or model, or when many
  requests in a row fail, instead of grinding through every class.

The API key is sent as ``Authorization: Bearer <key>`` only; it is never logged, never part of
a ``repr`` and is redacted from every error message.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import hashlib
import http.client
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bifta_core.errors import BiftaUserError, ConfigError

log = logging.getLogger("bifta.llm")

BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
MODEL_ENV = "OPENAI_MODEL"

# Cache record layout version; bump it when the stored fields change meaning.
_CACHE_VERSION = 1
# Longest server error text quoted in a message; bodies can be whole HTML pages.
_SNIPPET_CHARS = 200


class LLMError(BiftaUserError):
    """The LLM endpoint cannot be used: key rejected, unknown model or URL, or it keeps failing."""


@dataclass(frozen=True)
class ChatRequest:
    """One prompt and how many independent answers (samples) are wanted for it.

    ``label`` names what the prompt is about (the class); it is part of the cache key so that
    identical prompts for two classes with the same display name never share answers.
    """

    messages: tuple[Mapping[str, str], ...]
    label: str
    samples: int = 1
    temperature: float = 0.99
    max_tokens: int = 80


@dataclass(frozen=True)
class Completion:
    """One answer: its text, the server's ``finish_reason`` and whether it came from the cache."""

    text: str
    finish_reason: str | None = None
    cached: bool = False


@dataclass
class ChatResult:
    """The answers obtained for one :class:`ChatRequest`.

    ``completions`` holds the samples that succeeded, in sample order; each sample that could
    not be obtained adds a line to ``errors`` instead of raising.
    """

    request: ChatRequest
    completions: list[Completion] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class ClientStats:
    """Counters over the client's lifetime (updated from worker threads under a lock)."""

    http_requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failed_samples: int = 0


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection error)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Malformed(Exception):
    """The server answered 2xx but the body is not a usable chat completion."""


class _Permanent(Exception):
    """A 4xx that retrying will not fix; ``fatal`` when it will fail for every prompt too."""

    def __init__(self, reason: str, fatal: bool) -> None:
        super().__init__(reason)
        self.fatal = fatal


class _Exhausted(Exception):
    """Retries ran out for one request."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would turn the POST into a GET and resend the key elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def default_cache_dir() -> Path:
    """The ``llm`` folder of :mod:`bifta_core.io.cache`."""
    from bifta_core.io.cache import cache_dir

    return Path(cache_dir("llm"))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value, or ``None`` if unusable.

    Accepts delay-seconds (integer or decimal, as some gateways send) and HTTP-dates; a date in
    the past means "retry now" (0.0).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def retry_delay(
    attempt: int,
    retry_after: float | None,
    *,
    base_s: float,
    max_s: float,
    retry_after_max_s: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0-based).

    A server-provided ``Retry-After`` wins (capped at ``retry_after_max_s`` so a hostile or
    confused server cannot stall the run for hours). Otherwise exponential backoff capped at
    ``max_s``, scaled by a random factor in [0.5, 1] so that concurrent workers rejected
    together do not retry in lockstep.
    """
    if retry_after is not None:
        return min(retry_after, retry_after_max_s)
    backoff = min(max_s, base_s * (2.0 ** attempt))
    return backoff * (rng or random).uniform(0.5, 1.0)


def cache_key(
    model: str,
    messages: Sequence[Mapping[str, str]],
    label: str,
    sample: int,
    temperature: float,
    max_tokens: int,
) -> str:
    """sha256 hex digest identifying one sampled answer to one prompt.

    Sampling settings are included because a different temperature or token budget is a
    different experiment; the endpoint URL is not, so switching between mirrors of the same
    model reuses answers.
    """
    payload = {
        "v": _CACHE_VERSION,
        "model": model,
        "messages": [dict(m) for m in messages],
        "label": label,
        "sample": sample,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def write_json_atomic(path: Path, obj: object, *, indent: int | None = None) -> None:
    """Write ``obj`` as UTF-8 JSON to ``path`` so that readers never see a partial file.

    The text goes to a temporary file in the same directory (same filesystem), which then
    replaces ``path`` in one ``os.replace``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    if indent is not None:
        text += "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _snippet(raw: bytes | str) -> str:
    """First line-ish of a server body, single-line and short, for error messages."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET_CHARS else text[: _SNIPPET_CHARS - 3] + "..."


def _content_text(content: object) -> str | None:
    """The text of a message ``content``: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        texts = [p for p in parts if isinstance(p, str)]
        return "".join(texts) if texts else None
    return None


def parse_chat_response(data: object) -> list[Completion]:
    """Extract the answers from a decoded chat-completions response body.

    Raises:
        ValueError: the body has no ``choices`` or no choice carries text content.
    """
    if not isinstance(data, dict):
        raise ValueError("response body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        err = data.get("error")
        if isinstance(err, dict):
            err = err.get("message")
        detail = f" (server said: {_snippet(str(err))})" if err else ""
        raise ValueError(f"response has no choices{detail}")

    def order(item: tuple[int, object]) -> int:
        pos, ch = item
        idx = ch.get("index") if isinstance(ch, dict) else None
        return idx if isinstance(idx, int) else pos

    out: list[Completion] = []
    for _, ch in sorted(enumerate(choices), key=order):
        if not isinstance(ch, dict) or not isinstance(ch.get("message"), dict):
            continue
        text = _content_text(ch["message"].get("content"))
        if text is None:
            continue
        reason = ch.get("finish_reason")
        out.append(Completion(text, reason if isinstance(reason, str) else None))
    if not out:
        raise ValueError("no choice in the response has text content")
    return out


class ChatClient:
    """Thread-safe client for an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``; defaults
            to ``$OPENAI_BASE_URL``. A URL that already ends in ``/chat/completions`` is used
            as is.
        model: model name sent in each request; defaults to ``$OPENAI_MODEL``.
        api_key: bearer token; defaults to ``$OPENAI_API_KEY``. Without one no
            ``Authorization`` header is sent (local vLLM/Ollama servers need none).
        timeout_s: socket timeout for each HTTP request.
        max_retries: retries after a 429/5xx/timeout/connection error, per request.
        max_malformed_retries: retries after a 2xx answer that is not a usable completion.
        backoff_base_s, backoff_max_s: exponential backoff start and cap.
        retry_after_max_s: cap on a server's ``Retry-After``.
        max_concurrency: worker threads in :meth:`complete_all`.
        n_per_request: answers asked for per HTTP request via ``n`` (1: ``n`` is not sent,
            which every server supports). Servers that return fewer choices are asked again.
        cache_dir: answer cache folder, or ``None`` for no cache.
        abort_after_failures: stop the run (raise :class:`LLMError`) after this many requests
            in a row exhausted their retries; 0 disables the check.
        seed: seed for the backoff jitter (tests); ``None`` uses fresh randomness.

    Raises:
        ConfigError: missing base URL or model, or an invalid setting.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        max_malformed_retries: int = 2,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 60.0,
        max_concurrency: int = 8,
        n_per_request: int = 1,
        cache_dir: str | os.PathLike[str] | None = None,
        abort_after_failures: int = 20,
        seed: int | None = None,
    ) -> None:
        base_url = (base_url or os.environ.get(BASE_URL_ENV) or "").strip()
        if not base_url:
            raise ConfigError(
                f"no LLM endpoint given: pass --base-url or set {BASE_URL_ENV} "
                "(e.g. https://api.openai.com/v1 or http://localhost:8000/v1)"
            )
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"LLM base URL must be an http(s) URL, got {base_url!r}")
        model = (model or os.environ.get(MODEL_ENV) or "").strip()
        if not model:
            raise ConfigError(f"no LLM model given: pass --llm-model or set {MODEL_ENV}")
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV)
        for name, value, lo in (
            ("timeout", timeout_s, 0.0),
            ("backoff base", backoff_base_s, 0.0),
            ("backoff cap", backoff_max_s, 0.0),
            ("Retry-After cap", retry_after_max_s, 0.0),
        ):
            if not isinstance(value, (int, float)) or not value >= lo or math.isinf(value):
                raise ConfigError(f"LLM {name} must be a finite number >= {lo}, got {value!r}")
        if timeout_s <= 0:
            raise ConfigError(f"LLM timeout must be > 0 seconds, got {timeout_s!r}")
        for name, ivalue, ilo in (
            ("retries", max_retries, 0),
            ("malformed-answer retries", max_malformed_retries, 0),
            ("concurrency", max_concurrency, 1),
            ("answers per request (n)", n_per_request, 1),
            ("abort-after-failures", abort_after_failures, 0),
        ):
            if not isinstance(ivalue, int) or isinstance(ivalue, bool) or ivalue < ilo:
                raise ConfigError(f"LLM {name} must be an integer >= {ilo}, got {ivalue!r}")

        base = base_url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.base_url = base_url
        self.model = model
        self._api_key = api_key or None
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.max_malformed_retries = max_malformed_retries
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.retry_after_max_s = float(retry_after_max_s)
        self.max_concurrency = max_concurrency
        self.n_per_request = n_per_request
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.abort_after_failures = abort_after_failures
        self.stats = ClientStats()

        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fatal: LLMError | None = None
        self._consecutive_failures = 0
        self._cache_write_warned = False
        self._opener = urllib.request.build_opener(_NoRedirect())

    def __repr__(self) -> str:
        key = "<set>" if self._api_key else None
        return f"ChatClient(endpoint={self.endpoint!r}, model={self.model!r}, api_key={key})"

    # ---------------------------------------------------------------- public API

    def complete(self, request: ChatRequest) -> ChatResult:
        """Obtain ``request.samples`` answers, from the cache where possible.

        Per-sample failures (retries exhausted, prompt rejected with a 4xx) are recorded in the
        result's ``errors``.

        Raises:
            LLMError: the endpoint rejected the key, model or URL, or too many requests in a
                row failed; the whole run should stop.
        """
        if not isinstance(request.samples, int) or request.samples < 1:
            raise ConfigError(f"samples must be a positive integer, got {request.samples!r}")
        result = ChatResult(request)
        found: dict[int, Completion] = {}
        pending: list[int] = []
        for i in range(request.samples):
            hit = self._cache_get(request, i)
            if hit is None:
                pending.append(i)
            else:
                found[i] = hit
        if found:
            with self._lock:
                self.stats.cache_hits += len(found)

        while pending:
            self._check_stop()
            n = min(len(pending), self.n_per_request)
            batch, rest = pending[:n], pending[n:]
            try:
                answers = self._call(request, n)
            except _Exhausted as exc:
                self._note_failure(str(exc), len(batch))
                result.errors.append(f"{_samples_text(batch)}: {exc}")
                pending = rest
                continue
            except _Permanent as exc:
                # The same prompt would be rejected again; give up on its remaining samples.
                with self._lock:
                    self.stats.failed_samples += len(pending)
                result.errors.append(f"{_samples_text(pending)}: {exc}")
                break
            self._note_success()
            answers = answers[: len(batch)]
            for i, ans in zip(batch, answers):
                found[i] = ans
                self._cache_put(request, i, ans)
            # A server that ignores ``n`` returns fewer choices: ask again for the rest.
            pending = batch[len(answers):] + rest
        result.completions = [found[i] for i in sorted(found)]
        return result

    def complete_all(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[int, ChatResult]]:
        """Run :meth:`complete` over ``requests`` on ``max_concurrency`` threads.

        Yields ``(index into requests, result)`` pairs as they finish (not in input order).

        Raises:
            LLMError: as in :meth:`complete`; the remaining requests are cancelled.
        """
        self._stop.clear()
        self._fatal = None
        self._consecutive_failures = 0
        pool = cf.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="bifta-llm")
        futures = {pool.submit(self.complete, r): i for i, r in enumerate(requests)}
        try:
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()
        except BaseException:
            # Includes the consumer abandoning the generator: stop workers between requests.
            self._stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------------- internals

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise self._fatal or LLMError("LLM run was stopped")

    def _abort(self, message: str) -> LLMError:
        err = LLMError(self._redact(message))
        with self._lock:
            if self._fatal is None:
                self._fatal = err
            err = self._fatal
        self._stop.set()
        return err

    def _note_success(self) -> None:
        with self._lock:
            self._consecutive_failures = 0

    def _note_failure(self, reason: str, samples: int) -> None:
        with self._lock:
            self.stats.failed_samples += samples
            self._consecutive_failures += 1
            tripped = 0 < self.abort_after_failures <= self._consecutive_failures
            count = self._consecutive_failures
        log.warning("LLM request failed after retries: %s", reason)
        if tripped:
            raise self._abort(
                f"giving up: {count} LLM requests in a row failed at {self.endpoint}; "
                f"last error: {reason}"
            )

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "bifta-describe/0.1",
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _call(self, request: ChatRequest, n: int) -> list[Completion]:
        """One logical call with retries; returns between 1 and ``n`` answers."""
        body: dict[str, object] = {
            "model": self.model,
            "messages": [dict(m) for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if n > 1:
            body["n"] = n
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        transient = malformed = 0
        while True:
            self._check_stop()
            try:
                return parse_chat_response(self._post(payload))
            except _Transient as exc:
                if transient >= self.max_retries:
                    raise _Exhausted(f"{exc} (after {transient + 1} attempts)") from None
                delay = retry_delay(
                    transient,
                    exc.retry_after,
                    base_s=self.backoff_base_s,
                    max_s=self.backoff_max_s,
                    retry_after_max_s=self.retry_after_max_s,
                    rng=self._rng,
                )
                transient += 1
                reason = str(exc)
            except (_Malformed, ValueError) as exc:
                if malformed >= self.max_malformed_retries:
                    raise _Exhausted(
                        f"malformed response: {exc} (after {malformed + 1} attempts)"
                    ) from None
                delay = retry_delay(
                    malformed,
                    None,
                    base_s=self.backoff_base_s,
                    max_s=self.backoff_max_s,
                    retry_after_max_s=self.retry_after_max_s,
                    rng=self._rng,
                )
                malformed += 1
                reason = f"malformed response: {exc}"
            except _Permanent as exc:
                if exc.fatal:
                    raise self._abort(
                        f"LLM endpoint {self.endpoint} refused the request: {exc}"
                    ) from None
                raise
            with self._lock:
                self.stats.retries += 1
            log.debug("retrying %r in %.2fs: %s", request.label, delay, reason)
            # Waiting on the stop event lets a fatal error elsewhere cut the sleep short.
            self._stop.wait(delay)

    def _post(self, payload: bytes) -> object:
        """One HTTP attempt; returns the decoded JSON body or raises a classified error."""
        req = urllib.request.Request(
            self.endpoint, data=payload, headers=self._headers(), method="POST"
        )
        with self._lock:
            self.stats.http_requests += 1
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._classify_http_error(exc) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise _Transient(f"timed out after {self.timeout_s:g}s") from None
            raise _Transient(self._redact(f"connection failed: {reason}")) from None
        except TimeoutError:
            raise _Transient(f"timed out after {self.timeout_s:g}s") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            reason = f"connection failed: {type(exc).__name__}: {exc}"
            raise _Transient(self._redact(reason)) from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            snippet = self._redact(_snippet(raw))
            raise _Malformed(f"response body is not JSON: {snippet!r}") from None

    def _classify_http_error(self, exc: urllib.error.HTTPError) -> Exception:
        status = exc.code
        headers = exc.headers
        try:
            body = exc.read()
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            exc.close()
        detail = self._redact(_snippet(body))
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(headers.get("Retry-After") if headers else None)
            return _Transient(f"HTTP {status}" + (f": {detail}" if detail else ""), retry_after)
        if 300 <= status < 400:
            where = headers.get("Location", "?") if headers else "?"
            return _Permanent(
                f"HTTP {status} redirect to {self._redact(where)}; use that address as base URL",
                fatal=True,
            )
        # Wrong key/permissions or wrong URL/model fail for every prompt: stop the whole run.
        fatal = status in (401, 403, 404)
        return _Permanent(f"HTTP {status}" + (f": {detail}" if detail else ""), fatal=fatal)

    def _cache_path(self, request: ChatRequest, sample: int) -> Path | None:
        if self.cache_dir is None:
            return None
        key = cache_key(
            self.model,
            request.messages,
            request.label,
            sample,
            request.temperature,
            request.max_tokens,
        )
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, request: ChatRequest, sample: int) -> Completion | None:
        path = self._cache_path(request, sample)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                rec = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # A damaged entry is just a miss; the fresh answer will overwrite it.
            log.debug("ignoring unreadable cache entry %s", path)
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("content"), str):
            return None
        reason = rec.get("finish_reason")
        return Completion(rec["content"], reason if isinstance(reason, str) else None, cached=True)

    def _cache_put(self, request: ChatRequest, sample: int, answer: Completion) -> None:
        path = self._cache_path(request, sample)
        if path is None:
            return
        rec = {
            "v": _CACHE_VERSION,
            "model": self.model,
            "label": request.label,
            "sample": sample,
            "content": answer.text,
            "finish_reason": answer.finish_reason,
        }
        try:
            write_json_atomic(path, rec)
        except OSError as exc:
            # A full or read-only cache must not lose the answer we already paid for.
            with self._lock:
                warn, self._cache_write_warned = not self._cache_write_warned, True
            if warn:
                log.warning("cannot write LLM cache under %s: %s", self.cache_dir, exc)


def _samples_text(indices: Sequence[int]) -> str:
    if len(indices) == 1:
        return f"sample {indices[0]}"
    return f"samples {indices[0]}-{indices[-1]}"
