"""Hostile requests to ``phitune serve`` on 127.0.0.1, bounded in number and time: every answer is a success or a
well-formed error below 500, names no path of the server, comes within its timeout, and the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phitune
from conftest import Row, running
from phitune.server.app import create_app

pytestmark = pytest.mark.reliability

TIMEOUT = 600.0
"""The longest any answer may take: a request still unanswered then counts as stuck."""

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
CHAT_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["tiny-phi3", "ft:none", "../etc", "a/b", "", "x" * 300]) | st.text(max_size=10),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]), "content": JSON}), max_size=3
        )
        | JSON,
        "max_tokens": st.sampled_from([0, 1, -1, 10**9, 10**30, 2.5, "many"]),
        "temperature": st.sampled_from([0.0, 2.0, 3.0, -1.0, None]),
        "stream": st.booleans(),
        "n": st.sampled_from([1, 2]),
        "stop": JSON,
    },
)
JOB_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["tiny-phi3", "/etc", "../x", "~/.ssh", "acme/phi", "Phi-3-small-128k-instruct"]),
        "training_file": st.sampled_from(["file-none", "../../phitune.db", ""]) | st.text(max_size=10),
        "hyperparameters": JSON,
        "method": JSON,
        "phitune": JSON,
        "suffix": st.text(max_size=70),
    },
)
PATHS = st.sampled_from(
    [
        "/files/{}",
        "/files/{}/content",
        "/fine_tuning/jobs/{}",
        "/fine_tuning/jobs/{}/events",
        "/fine_tuning/jobs/{}/checkpoints",
        "/models/{}",
        "/phitune/deployments/{}",
    ]
)
IDS = st.sampled_from(["../../phitune.db", "..%2F..%2Fphitune.db", "%00", "file-é", "x" * 5000, "ftjob-"]) | st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30
)
"""Object ids, as sent in a path (quoted, but for ``/``, ``.``, ``%`` and ``~``: traversals go as they are)."""


class _Judge:
    """Sends requests and enters how each was answered in a ledger row."""

    def __init__(self, row: Row, home: Path) -> None:
        self.row = row
        self.forbidden = [str(home), "site-packages", "Traceback"]
        self.lock = threading.Lock()
        self.failures: list[str] = []

    def send(self, method: str, url: str, **options: Any) -> httpx.Response | None:
        with self.lock:
            self.row.tried += 1
        try:
            answer = httpx.request(method, url, timeout=TIMEOUT, **options)
        except httpx.TimeoutException:
            return self._note("stuck", f"{method} {url}: no answer in {TIMEOUT} s")
        if answer.status_code >= 500:
            return self._note("lost", f"{method} {url}: {answer.status_code} {answer.text[:200]}")
        if any(text in answer.text for text in self.forbidden):
            return self._note("leaked", f"{method} {url}: {answer.text[:300]}")
        if answer.status_code >= 400 and set(answer.json().get("error", {})) != {"message", "type", "param", "code"}:
            return self._note("lost", f"{method} {url}: not an OpenAI error: {answer.text[:200]}")
        with self.lock:
            self.row.survived += 1
        return answer

    def _note(self, outcome: str, failure: str) -> None:
        with self.lock:
            setattr(self.row, outcome, getattr(self.row, outcome) + 1)
            self.failures.append(failure)


def test_hostile_requests_get_proper_answers(home: Path, chat_file: Path, ledger: Callable[[str], Row]) -> None:
    row = ledger("serve: hostile requests to 127.0.0.1")
    judge = _Judge(row, home)
    client = phitune.Client(home=home)
    uploaded = client.files.upload(chat_file)
    hyperparameters = {"max_steps": 2, "checkpoint_every": 1, "batch_size": 4, "max_seq_length": 128}
    trained = client.finetune.create(model="tiny-phi3", training_file=uploaded.id, hyperparameters=hyperparameters)
    assert client.finetune.wait(trained.id, timeout=1800, progress=False).status == "succeeded"
    app = create_app(home, max_upload_bytes=1 << 20, max_pending_chats=4, generation_seconds=30)
    with running(app, log_level="critical") as url:
        json_headers = {"Content-Type": "application/json"}

        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=CHAT_FIELDS)
        def chat(body: dict[str, Any]) -> None:
            body = {**body, "max_tokens": body.get("max_tokens", 4)} if body.get("model") == "tiny-phi3" else body
            judge.send("POST", f"{url}/chat/completions", content=json.dumps(body), headers=json_headers)

        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=JOB_FIELDS)
        def job(body: dict[str, Any]) -> None:
            judge.send("POST", f"{url}/fine_tuning/jobs", content=json.dumps(body), headers=json_headers)

        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(path=PATHS, ident=IDS, method=st.sampled_from(["GET", "DELETE", "POST"]))
        def lookup(path: str, ident: str, method: str) -> None:
            judge.send(method, url + path.format(quote(ident, safe="/.%~")))

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=st.binary(max_size=2000), boundary=st.sampled_from(["b", "", "x" * 80]))
        def upload(body: bytes, boundary: str) -> None:
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            judge.send("POST", f"{url}/files", content=body, headers=headers)

        for battery in (chat, job, lookup, upload):
            battery()
        for raw in _raw_requests(url, uploaded.id, trained.id):
            judge.send(*raw[:2], **raw[2])
        _burst_of_chats(judge, url)
        assert judge.send("GET", f"{url}/models") is not None  # still serving
    row.leaked += len(list((home / "tmp").glob("upload-*")))
    assert judge.failures == []


def _raw_requests(url: str, file_id: str, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Requests no generator would stumble on: deep nesting, cut bodies, long names, other hosts, huge numbers."""
    deep = b'{"model": "tiny-phi3", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n\r\n'
    end = b"\r\n--b--\r\n"
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    return [
        ("POST", f"{url}/chat/completions", {"content": deep, "headers": {"Content-Type": "application/json"}}),
        ("POST", f"{url}/fine_tuning/jobs", {"content": deep, "headers": {"Content-Type": "application/json"}}),
        ("POST", f"{url}/files", {"content": part % b"d.jsonl" + b"[" * 5000 + end, "headers": multipart}),
        ("POST", f"{url}/files", {"content": part % ("é" * 200).encode() + line + end, "headers": multipart}),
        ("POST", f"{url}/files", {"content": part % b"cut.jsonl" + line, "headers": multipart}),
        ("GET", f"{url}/fine_tuning/jobs?limit=0", {}),
        ("GET", f"{url}/fine_tuning/jobs?after=ftjob-none", {}),
        ("GET", f"{url}/files?after=file-none&limit=100000", {}),
        ("GET", f"{url}/files/{file_id}/content", {"headers": {"Host": "evil.example"}}),
        ("GET", f"{url}/models", {"headers": {"Origin": "http://evil.example"}}),
        ("POST", f"{url}/fine_tuning/jobs/ftjob-none/cancel", {}),
        ("POST", f"{url}/fine_tuning/jobs/{job_id}/cancel", {}),
        ("POST", f"{url}/fine_tuning/jobs/{job_id}/pause", {}),
        ("POST", f"{url}/fine_tuning/jobs/{job_id}/resume", {}),
        ("GET", f"{url}/fine_tuning/jobs/{job_id}/events?after=ftevent-{'9' * 40}", {}),
        ("GET", f"{url}/fine_tuning/jobs/{job_id}/events?after=ftevent-{'9' * 40}&order=asc", {}),
        ("GET", f"{url}/fine_tuning/jobs/{job_id}/events?after=ftevent-%C2%B2&order=asc", {}),
        ("GET", f"{url}/fine_tuning/jobs/{job_id}/checkpoints?after=ftckpt-none", {}),
        ("POST", f"{url}/phitune/deployments", {"json": {"model": "tiny-phi3", "name": "../../x"}}),
        ("POST", f"{url}/phitune/deployments", {"json": {"model": "tiny-phi3", "name": "ok", "engine": "../x"}}),
        (
            "POST",
            f"{url}/chat/completions",
            {"json": {"model": "tiny-phi3", "messages": [{"role": "user", "content": "bees " * 9000}]}},
        ),
        ("POST", f"{url}/chat/completions", {"json": {"model": "tiny-phi3", "messages": [], "max_tokens": 10**9}}),
    ]


def _burst_of_chats(judge: _Judge, url: str) -> None:
    """25 chats at once against 4 slots: each is answered (200) or asked to retry (429), and the slots come back."""
    request = {"model": "tiny-phi3", "messages": [{"role": "user", "content": "What do bees make?"}], "max_tokens": 8}
    with concurrent.futures.ThreadPoolExecutor(25) as pool:
        answers = list(pool.map(lambda _: judge.send("POST", f"{url}/chat/completions", json=request), range(25)))
    assert {answer.status_code for answer in answers if answer is not None} <= {200, 429}
    after = judge.send("POST", f"{url}/chat/completions", json=request)
    assert after is not None and after.status_code == 200, after
