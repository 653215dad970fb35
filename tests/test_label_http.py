"""The HTTP teacher against a fake OpenAI-compatible server on 127.0.0.1, and resume after kill -9.

The server's behaviour per row is chosen by the query text: canned logprobs, 429s, 500s, a slow
response, malformed bodies, grades missing from the top logprobs, a dropped connection. Every row
must end labelled or failed with its reason, nothing twice, and the retries counted.
"""

import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bixse_jax.label import rows as rows_lib, run
from bixse_jax.label.http_teacher import HttpTeacher

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
KEY = "sk-test-secret-123"


def canned(doc: str) -> dict[str, float]:
    """The server's top logprobs for a document: grade d%4 most likely, plus a non-grade token."""
    g = int(doc.rsplit("-", 1)[-1]) % 4
    lp = {"0": -3.0, " 1": -2.5, "2": -2.0, "3": -4.0, "The": -0.5}
    lp[[k for k in lp if k.strip() == str(g)][0]] = -0.7
    return lp


class FakeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay = delay
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.answered: list[str] = []  # doc ids answered with logprobs
        self.auth: set[str] = set()

    def handle_error(self, request, client_address):
        pass  # a client that timed out or was killed: expected here

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        server: FakeServer = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = req["messages"][0]["content"] if "messages" in req else req["prompt"]
        query, doc = text.split("Q=")[1].split(" D=")
        with server.lock:
            n = server.attempts[doc] = server.attempts.get(doc, 0) + 1
            server.auth.add(self.headers.get("Authorization", ""))
        time.sleep(server.delay)
        kind, _, count = query.partition("x")
        if kind == "r429" and n <= int(count):
            return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
        if kind == "r500" and n <= int(count):
            return self._send(500, b"oops")
        if kind == "slow" and n == 1:
            time.sleep(1.0)  # past the client's timeout
        if kind == "drop" and n == 1:
            self.close_connection = True
            return  # no response at all: the client sees the connection closed
        if kind == "badjson":
            return self._send(200, b"{not json")
        if kind == "nochoices":
            return self._send(200, b'{"choices": []}')
        if kind == "forbidden":
            return self._send(403, b'{"error": "no"}')
        lp = canned(doc)
        if kind == "nogrades":
            lp = {"The": -0.1, "A": -2.5}
        if "messages" in req:
            assert req["logprobs"] is True and req["top_logprobs"] == 20 and req["max_tokens"] == 1
            body = {"choices": [{"logprobs": {"content": [{"token": "The", "logprob": -0.5, "top_logprobs":
                                                          [{"token": t, "logprob": v} for t, v in lp.items()]}]}}]}
        else:
            assert req["logprobs"] == 20 and req["max_tokens"] == 1
            body = {"choices": [{"text": "The", "logprobs": {"tokens": ["The"], "top_logprobs": [lp]}}]}
        with server.lock:
            server.answered.append(doc)
        self._send(200, json.dumps(body).encode())


@pytest.fixture
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


KINDS = {"ok": None, "r429x2": None, "r500x1": None, "slow": None, "drop": None, "r500x99": "gave up after 2 retries: HTTP 500",
         "badjson": "malformed response: not JSON", "nochoices": "malformed response",
         "nogrades": "grade tokens ['0', '1', '2', '3'] not among", "forbidden": "HTTP 403"}


def _rows():
    return [{"query_id": kind, "doc_id": f"{kind}-{i}", "query": kind, "document": f"{kind}-{i}"}
            for kind in KINDS for i in range(3 if kind == "ok" else 1)]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_every_row_ends_labelled_or_failed_once_with_retries_counted(server, tmp_path, monkeypatch, capsys, api):
    monkeypatch.setenv("FAKE_KEY", KEY)
    teacher = HttpTeacher(server.url, "fake", grades=[0, 1, 2, 3], template="Q={query} D={document}", api=api,
                          concurrency=4, timeout=0.5, max_retries=2, api_key_env="FAKE_KEY", backoff=0.01,
                          batch_size=5)
    data = _rows()
    with rows_lib.ResumableWriter(tmp_path / "out.jsonl") as writer:
        report = run.label_rows(teacher, data, writer, progress=False)
    labelled = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    failed = [json.loads(line) for line in (tmp_path / "out.jsonl.failed.jsonl").read_text().splitlines()]
    assert len(labelled) + len(failed) == len(data) == report["labelled"] + report["failed"]
    ids = [r["doc_id"] for r in labelled + failed]
    assert len(set(ids)) == len(ids)  # nothing duplicated
    reasons = {r["query_id"]: r["reason"] for r in failed}
    assert {k for k, v in KINDS.items() if v} == set(reasons)
    for kind, expected in KINDS.items():
        if expected:
            assert expected in reasons[kind], (kind, reasons[kind])
    # retries: 2 (429) + 1 (500) + 1 (timeout) + 1 (dropped) + 2 (always 500, then given up)
    assert teacher.stats["retries"] == 7
    assert server.attempts["r500x99-0"] == 3 and server.attempts["forbidden-0"] == 1
    for row in labelled:
        lp = canned(row["doc_id"])
        grade_lp = np.array([lp[k] for k in sorted(lp, key=str.strip) if k.strip().isdigit()])
        p = np.exp(grade_lp) / np.exp(grade_lp).sum()
        np.testing.assert_allclose(list(row["grade_probs"].values()), p, atol=1e-12)
        assert row["grade"] == int(row["doc_id"].rsplit("-", 1)[1]) % 4
        assert row["score"] == pytest.approx(float(p @ np.arange(4)) / 3)
        assert row["grade_mass"] == pytest.approx(math.fsum(np.exp(grade_lp)))
    assert server.auth == {f"Bearer {KEY}"}
    assert KEY not in json.dumps(report) and KEY not in capsys.readouterr().err


def _cli(url, inp, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), FAKE_KEY=KEY)
    return subprocess.Popen([sys.executable, "-m", "bixse_jax.cli", "label", "--teacher", url, "--model", "fake",
                             "--input", str(inp), "--out", str(out), "--concurrency", "1", "--batch-size", "2",
                             "--api-key-env", "FAKE_KEY", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _wait_for_lines(path, n, proc, limit=60.0):
    end = time.monotonic() + limit
    while len(_lines(path)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the labeller wrote nothing in time"
        time.sleep(0.02)


def test_sigterm_stops_after_the_batch_and_kill_9_resumes_without_duplicates(tmp_path):
    srv = FakeServer(delay=0.03)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        data = [{"query_id": f"q{i % 5}", "doc_id": f"ok-{i}", "query": "ok", "document": f"ok-{i}"} for i in range(60)]
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in data))
        extra = ("--prompt", str(tmp_path / "p.txt"))
        (tmp_path / "p.txt").write_text("Q={query} D={document}")

        proc = _cli(srv.url, inp, out, *extra)  # 1: SIGTERM -> finishes its batch, exits 0
        _wait_for_lines(out, 4, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        first = json.loads(stdout)["label"]
        assert first["stopped_by"] == "SIGTERM" and first["labelled"] % 2 == 0 and first["left"] > 0
        assert len(_lines(out)) == first["labelled"]

        proc = _cli(srv.url, inp, out, *extra)  # 2: kill -9 mid-run
        _wait_for_lines(out, first["labelled"] + 6, proc)
        proc.kill()
        proc.communicate()
        killed_at = len(_lines(out))
        assert killed_at < len(data)

        proc = _cli(srv.url, inp, out, *extra)  # 3: finishes the file
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        last = json.loads(stdout)["label"]
        assert last["already_labelled"] >= killed_at - 1 and last["left"] == 0 and last["failed"] == 0
        ids = [json.loads(line)["doc_id"] for line in _lines(out)]
        assert sorted(ids) == sorted(r["doc_id"] for r in data)  # each row exactly once
        assert KEY not in stdout + stderr
    finally:
        srv.shutdown()
        srv.server_close()
