"""A teacher served elsewhere: an OpenAI-compatible server (vLLM, llama.cpp's server, TGI) read through logprobs.

`/v1/chat/completions` is asked for one token with `logprobs` and `top_logprobs`; `/v1/completions`
for one token with `logprobs` (the prompt is then sent as is: the server's chat template is not
applied). The grade tokens are looked up among the returned alternatives by their text (a
leading space ignored, variants of one grade summed); a response in which any grade is missing is
that row's failure, with the reason, never a silent 0. Requests run `concurrency` at a time
(stdlib only: urllib in a thread pool), each with a timeout; 429, 5xx and connection errors are
retried with exponential backoff (a server's Retry-After is honoured up to `max_backoff`). The
API key is read from an environment variable and only ever sent as the bearer token.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator, Sequence

import numpy as np

from bixse_jax.label import prompts
from bixse_jax.label.grades import Outcome

RETRY_STATUS = (429, 500, 502, 503, 504)


class _Retry(Exception):
    """A transient failure: the request may be sent again."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class HttpTeacher:
    def __init__(self, base_url: str, model: str, *, grades: Sequence[int], template: str, api: str = "chat",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5,
                 api_key_env: str = "OPENAI_API_KEY", top_logprobs: int = 20, batch_size: int | None = None,
                 backoff: float = 0.5, max_backoff: float = 30.0, name: str | None = None):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.url = base_url.rstrip("/") + ("/chat/completions" if api == "chat" else "/completions")
        self.model, self.api, self.template = model, api, template
        self.name = name or model
        self.grades = list(grades)
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.top_logprobs, self.backoff, self.max_backoff = top_logprobs, backoff, max_backoff
        self.batch_size = batch_size or 4 * concurrency
        self._api_key = os.environ.get(api_key_env) or None  # never printed, logged or put in stats
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {"requests": 0, "retries": 0, "retry_reasons": {}, "failures": 0}

    def _count(self, key: str, reason: str | None = None) -> None:
        with self._lock:
            self.stats[key] += 1
            if reason is not None:
                kind = reason.split(":")[0]
                self.stats["retry_reasons"][kind] = self.stats["retry_reasons"].get(kind, 0) + 1

    def payload(self, row: dict[str, Any]) -> dict[str, Any]:
        text = prompts.fill(self.template, row["query"], row["document"])
        common = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        if self.api == "chat":
            return {**common, "messages": [{"role": "user", "content": text}], "logprobs": True,
                    "top_logprobs": self.top_logprobs}
        return {**common, "prompt": text, "logprobs": self.top_logprobs}

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One request -> the decoded JSON body; _Retry on a transient failure, ValueError on a final one."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        self._count("requests")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            text = e.read()[:200].decode("utf-8", "replace")
            if e.code in RETRY_STATUS:
                after = e.headers.get("Retry-After") if e.headers else None
                wait = float(after) if after and after.replace(".", "", 1).isdigit() else None
                raise _Retry(f"HTTP {e.code}: {text}", wait) from None
            raise ValueError(f"HTTP {e.code}: {text}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, timed out
            raise _Retry(f"connection: {getattr(e, 'reason', None) or e!r}") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"malformed response: not JSON ({e}): {body[:100]!r}") from None

    def top_alternatives(self, data: dict[str, Any]) -> dict[str, float]:
        """token text -> logprob of the first generated token's alternatives, in either API's format."""
        try:
            logprobs = data["choices"][0]["logprobs"]
            if self.api == "chat":
                return {str(t["token"]): float(t["logprob"]) for t in logprobs["content"][0]["top_logprobs"]}
            return {str(k): float(v) for k, v in logprobs["top_logprobs"][0].items()}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed response: no top logprobs of the first token ({type(e).__name__}: {e})") from None

    def grade_logprobs(self, alternatives: dict[str, float]) -> np.ndarray:
        """[G] log-probabilities of the grades (token variants of one grade summed); ValueError if one is absent."""
        out = np.full(len(self.grades), -np.inf)
        for token, logprob in alternatives.items():
            text = token.strip()
            for i, grade in enumerate(self.grades):
                if text == str(grade):
                    out[i] = np.logaddexp(out[i], logprob)
        missing = [str(g) for g, v in zip(self.grades, out) if not np.isfinite(v)]
        if missing:
            shown = sorted(alternatives, key=alternatives.get, reverse=True)[:5]
            raise ValueError(f"grade tokens {missing} not among the top {len(alternatives)} logprobs "
                             f"(top: {shown})")
        return out

    def label_one(self, row: dict[str, Any]) -> Outcome:
        payload = self.payload(row)
        for attempt in range(self.max_retries + 1):
            try:
                grade_logprobs = self.grade_logprobs(self.top_alternatives(self._post(payload)))
                return Outcome(row, grade_logits=grade_logprobs, grade_mass=float(np.exp(grade_logprobs).sum()))
            except ValueError as e:
                self._count("failures")
                return Outcome(row, error=str(e))
            except _Retry as e:
                if attempt == self.max_retries:
                    self._count("failures")
                    return Outcome(row, error=f"gave up after {self.max_retries} retries: {e}")
                self._count("retries", str(e))
                wait = min(self.max_backoff, e.wait if e.wait is not None else self.backoff * 2 ** attempt)
                time.sleep(wait * (1 + 0.1 * random.random()))
        raise AssertionError("unreachable")

    def label(self, rows: Sequence[dict[str, Any]]) -> Iterator[list[Outcome]]:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            for start in range(0, len(rows), self.batch_size):
                yield list(pool.map(self.label_one, rows[start:start + self.batch_size]))
