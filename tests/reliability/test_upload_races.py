"""Uploads and deletes of one content racing in several processes, and uploads killed at random points: no file id
ever points at a missing or different content, and nothing the killed uploads began stays in the home."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import phitune
from conftest import Row, child_env

pytestmark = pytest.mark.reliability

_RACER = """
import sys, phitune
client = phitune.Client(home=sys.argv[1])
expected = open(sys.argv[2], "rb").read()
lost = 0
for _ in range(int(sys.argv[3])):
    file_id = client.files.upload(sys.argv[2]).id
    try:
        lost += client.backend.file_content(file_id).read_bytes() != expected
    except Exception:
        lost += 1
    client.files.delete(file_id)
print(lost)
"""


def test_racing_uploads_and_deletes_of_one_content(home: Path, chat_file: Path, ledger: Callable[[str], Row]) -> None:
    row = ledger("uploads and deletes of one content, 4 processes racing")
    phitune.Client(home=home)
    rounds = 25
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(home), str(chat_file), str(rounds)],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for _ in range(4)
    ]
    for racer in racers:
        try:
            out, _ = racer.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            racer.kill()
            row.tried += rounds
            row.stuck += rounds
            continue
        row.tried += rounds
        lost = int(out) if racer.returncode == 0 else rounds
        row.lost += lost
        row.survived += rounds - lost
    row.leaked += len(phitune.Client(home=home).files.list())  # every upload was deleted again
    row.leaked += sum(1 for path in (home / "files").rglob("*") if path.is_file())


_UPLOAD = "import sys, phitune; phitune.Client(home=sys.argv[1]).files.upload(sys.argv[2])"


def test_uploads_killed_at_random_points_leave_nothing(
    home: Path, tmp_path: Path, ledger: Callable[[str], Row]
) -> None:
    """Each upload is killed at a random point between the moment its staging folder appears and the time a whole
    upload took (measured first): while copying, validating or storing. Kills that land after the upload ended do
    not count."""
    seed = int(os.environ.get("PHITUNE_CHAOS_SEED", "23"))
    chaos = random.Random(seed)
    row = ledger(f"uploads killed at random points (seed {seed})")
    big = tmp_path / "big.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "q" * 400}, {"role": "assistant", "content": "a"}]})
    big.write_text((line + "\n") * 40_000)  # ~17 MB
    client = phitune.Client(home=home)
    started = time.monotonic()
    kept = client.files.upload(big)
    whole = time.monotonic() - started
    for _ in range(20):  # until 8 kills have landed mid-upload
        upload = subprocess.Popen([sys.executable, "-c", _UPLOAD, str(home), str(big)], env=child_env())
        deadline = time.monotonic() + 600
        while not list((home / "tmp").glob("upload-*")) and upload.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(chaos.uniform(0.0, whole))
        midway = upload.poll() is None and bool(list((home / "tmp").glob("upload-*")))
        upload.kill()
        upload.wait()
        row.tried += midway
        if row.tried == 8:
            break
    survivors = phitune.Client(home=home).files.list()  # a new client sweeps what the killed uploads left
    content = big.read_bytes()
    expected = hashlib.sha256(content).hexdigest()
    backend = client.backend
    row.lost += sum(f.sha256 != expected or backend.file_content(f.id).read_bytes() != content for f in survivors)
    row.lost += kept.id not in {f.id for f in survivors}
    leftovers = list((home / "tmp").glob("upload-*"))
    leftovers += [p for p in (home / "files").rglob("*") if p.is_file() and p.name != f"{expected}.jsonl"]
    row.leaked += len(leftovers)
    row.survived = row.tried - row.lost - row.leaked
    assert leftovers == []
