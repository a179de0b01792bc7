"""The local home under faults: copied elsewhere, written by racing uploads and deletes, left behind by uploads
killed midway or cut short by a full disk, with a read-only, damaged or lost database, or with contents deleted
behind the store's back."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import phitune
from conftest import child_env
from phitune.errors import MissingContentError, StoreError
from phitune.local.store import Store

FAST = {"batch_size": 4, "learning_rate": 3e-3, "max_seq_length": 128, "seed": 0}


def _child(code: str, *args: str, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with this checkout's phitune; its output and exit status."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
        preexec_fn=preexec_fn,
    )


_REPORT = """
import sys, phitune
try:
    print(len(phitune.Client(home=sys.argv[1]).files.list()))
except Exception as error:
    print(type(error).__name__, error)
"""
"""Lists a home's files in a child process; prints their count, or the error's type and message."""


# -------------------------------------------------------------------------------------------- relocatable home
def test_a_copied_home_keeps_to_its_own_files(home: Path, chat_file: Path, tmp_path: Path) -> None:
    """The database keeps paths relative to the home: in a copy, models, checkpoints and datasets are the copy's
    own, so deleting there never touches the original, and chat loads the copy's adapter."""
    client = phitune.Client(home=home)
    uploaded = client.files.upload(chat_file)
    job = client.finetune.create(
        model="tiny-phi3", training_file=uploaded.id, hyperparameters={**FAST, "max_steps": 2, "checkpoint_every": 1}
    )
    job = client.finetune.wait(job.id, timeout=1800, progress=False)
    assert job.status == "succeeded" and job.fine_tuned_model is not None, job.error
    copy = tmp_path / "copy"
    shutil.copytree(home, copy)

    moved = phitune.Client(home=copy)
    model_path = moved.models.get(job.fine_tuned_model).path
    assert model_path is not None and Path(model_path).is_relative_to(copy)
    locations = [c.location for c in moved.finetune.checkpoints(job.id)]
    assert locations and all(loc is not None and Path(loc).is_relative_to(copy) for loc in locations)

    original_model = client.models.get(job.fine_tuned_model).path
    assert original_model is not None
    shutil.rmtree(original_model)  # the original's weights are gone: the copy chats with its own
    deployment = moved.deployments.create(model=job.fine_tuned_model, name="copied")
    reply = deployment.chat([{"role": "user", "content": "What is two plus two?"}], max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    with pytest.raises(MissingContentError, match="the weights of model"):  # and the original says its are gone
        client.deployments.create(model=job.fine_tuned_model, name="original")

    moved.files.delete(uploaded.id)  # the copy's blob goes; the original's stays
    assert client.backend.file_content(uploaded.id).read_bytes() == chat_file.read_bytes()


def test_a_home_of_the_earlier_layout_is_converted_when_it_opens(home: Path, chat_file: Path) -> None:
    """A database whose rows hold absolute paths (of wherever the home was made) is rewritten to paths relative to
    the home the first time a store opens it."""
    uploaded = phitune.Client(home=home).files.upload(chat_file)
    elsewhere = "/elsewhere/phitune-home"
    with contextlib.closing(sqlite3.connect(home / "phitune.db")) as db:
        db.execute("UPDATE files SET blob = ? || '/' || blob", (elsewhere,))
        checkpoint = f"{elsewhere}/jobs/ftjob-1/checkpoints/step-000003"
        db.execute("INSERT INTO checkpoints VALUES ('ftjob-1', 3, 0, '{}', ?)", (checkpoint,))
        weights = f"{elsewhere}/models/fine-tuned/ft_tiny-phi3__1"
        db.execute("INSERT INTO models VALUES ('ft:tiny-phi3::1', 0, 'adapter', 'tiny-phi3', 'ftjob-1', ?)", (weights,))
        db.execute("PRAGMA user_version=0")
        db.commit()

    store = Store(home)
    assert store.file_blob(uploaded.id).read_bytes() == chat_file.read_bytes()
    found = store.find_model("ft:tiny-phi3::1")
    assert found is not None and found.path == str(home / "models" / "fine-tuned" / "ft_tiny-phi3__1")
    with contextlib.closing(sqlite3.connect(home / "phitune.db")) as db:
        assert db.execute("SELECT path FROM checkpoints").fetchone()[0] == "jobs/ftjob-1/checkpoints/step-000003"
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1


# ----------------------------------------------------------------------------------------------------- races
_UPLOAD_CHECK_DELETE = """
import sys, phitune
client = phitune.Client(home=sys.argv[1])
lost = 0
for _ in range(int(sys.argv[3])):
    file_id = client.files.upload(sys.argv[2]).id
    try:
        assert client.backend.file_content(file_id).read_bytes() == open(sys.argv[2], "rb").read()
    except Exception:
        lost += 1
    client.files.delete(file_id)
print(lost)
"""


def test_uploads_and_deletes_of_one_content_never_lose_it(home: Path, chat_file: Path) -> None:
    """Processes upload the same content, check it and delete it, all at once: an upload's content is there when
    it returns, whatever the interleaving of the racing uploads and deletes."""
    phitune.Client(home=home)  # the database exists before the processes start
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _UPLOAD_CHECK_DELETE, str(home), str(chat_file), "40"],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for _ in range(3)
    ]
    lost = [int(racer.communicate(timeout=1800)[0]) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    assert lost == [0, 0, 0]
    assert phitune.Client(home=home).files.list() == []
    assert [p for p in (home / "files").rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------------------------------- killed uploads
_DIE_WHILE_COPYING = """
import os, shutil, signal, sys, phitune

def copy_half_then_die(source, target, *args, **kwargs):
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as out:
            out.write(b"half a dataset")
    else:
        target.write(b"half a dataset")
        target.flush()
    os.kill(os.getpid(), signal.SIGKILL)

shutil.copyfile = shutil.copyfileobj = copy_half_then_die
phitune.Client(home=sys.argv[1]).files.upload(sys.argv[2])
"""


def test_what_killed_uploads_leave_is_swept(home: Path, chat_file: Path) -> None:
    """An upload killed while copying leaves a staging folder; one killed after its blob entered the store but before
    its row did leaves an unregistered blob. The next client of the home removes both."""
    client = phitune.Client(home=home)
    kept = client.files.upload(chat_file)
    died = _child(_DIE_WHILE_COPYING, str(home), str(chat_file))
    assert died.returncode == -9, died.stderr
    orphan = home / "files" / "ab" / f"ab{'0' * 62}.jsonl"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_text("{}\n")

    phitune.Client(home=home)
    assert not orphan.exists()
    assert list((home / "tmp").glob("*")) == []
    blobs = sorted(p.relative_to(home) for p in (home / "files").rglob("*") if p.is_file())
    assert blobs == [Path("files") / kept.sha256[:2] / f"{kept.sha256}.jsonl"]
    assert [f.id for f in client.files.list()] == [kept.id]


_FULL_DISK = """
import resource, signal, sys, phitune
client = phitune.Client(home=sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    client.files.upload(sys.argv[2])
    print("stored")
except Exception as error:
    print("refused:", type(error).__name__)
print(len(client.files.list()))
"""


def test_an_upload_cut_short_by_a_full_disk_leaves_nothing_and_the_home_works(home: Path, tmp_path: Path) -> None:
    """Writes fail past 1 MiB (as they would on a full disk): the upload fails, leaves no partial copy, and the
    home's database still answers."""
    big = tmp_path / "big.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "x" * 1000}, {"role": "assistant", "content": "y"}]})
    big.write_text((line + "\n") * 3000)
    done = _child(_FULL_DISK, str(home), str(big))
    assert done.returncode == 0, done.stderr
    outcome, listed = done.stdout.split("\n")[:2]
    assert outcome.startswith("refused:") and listed == "0", done.stdout
    assert [p for p in (home / "files").rglob("*") if p.is_file()] + list((home / "tmp").glob("*")) == []


# -------------------------------------------------------------------------------------- the database itself
@pytest.fixture
def read_only_home(home: Path, chat_file: Path) -> Iterator[Path]:
    """``home`` holding one uploaded file, then made read-only (its write permissions taken away)."""
    phitune.Client(home=home).files.upload(chat_file)
    paths = [home, *home.rglob("*")]
    modes = {path: path.stat().st_mode for path in paths}
    for path in paths:
        path.chmod(modes[path] & ~0o222)
    try:
        yield home
    finally:
        for path in reversed(paths):
            path.chmod(modes[path])


def _without_root_privileges() -> None:
    """In the child, before exec: take from root the capabilities that override file permissions (from the bounding
    set, so that they stay dropped across exec), so that a read-only home is read-only to it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_home_is_a_store_error(read_only_home: Path) -> None:
    done = _child(_REPORT, str(read_only_home), preexec_fn=_without_root_privileges if os.geteuid() == 0 else None)
    assert done.stdout.startswith("StoreError ") and "cannot be written" in done.stdout, done.stdout + done.stderr
    assert "make the home writable" in done.stdout


def test_a_damaged_database_is_a_store_error(home: Path, chat_file: Path) -> None:
    phitune.Client(home=home).files.upload(chat_file)
    for suffix in ("-wal", "-shm"):
        (home / f"phitune.db{suffix}").unlink(missing_ok=True)
    (home / "phitune.db").write_bytes(b"not a database at all " * 512)
    done = _child(_REPORT, str(home))
    assert done.stdout.startswith("StoreError ") and "is damaged" in done.stdout, done.stdout + done.stderr
    assert "restore it from a backup" in done.stdout


@pytest.mark.parametrize("loss", ["missing", "empty"])
def test_a_lost_database_beside_data_is_never_replaced_by_an_empty_one(home: Path, chat_file: Path, loss: str) -> None:
    phitune.Client(home=home).files.upload(chat_file)
    for suffix in ("", "-wal", "-shm"):
        (home / f"phitune.db{suffix}").unlink(missing_ok=True)
    if loss == "empty":
        (home / "phitune.db").touch()
    with pytest.raises(StoreError, match=f"phitune.db is {loss}.*holds files/"):
        phitune.Client(home=home)
    assert (home / "phitune.db").exists() == (loss == "empty") and not (home / "phitune.db-wal").exists()
    assert next((home / "files").rglob("*.jsonl")).is_file()  # the data stays as it was


# ------------------------------------------------------------------------------- contents gone behind its back
def test_a_job_on_a_dataset_whose_stored_copy_is_gone_is_refused(home: Path, chat_file: Path) -> None:
    client = phitune.Client(home=home)
    uploaded = client.files.upload(chat_file)
    client.backend.file_content(uploaded.id).unlink()
    with pytest.raises(MissingContentError, match="upload the dataset again"):
        client.finetune.create(model="tiny-phi3", training_file=uploaded.id, hyperparameters={"max_steps": 1})
    assert client.finetune.list() == []
