from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import cast

from .. import catalog
from .._ops import Op
from ..backends.base import StagingBackend
from ..errors import DatasetError
from ..types import DatasetReport, FileObject
from ._base import AsyncResource, Blocking, Call, Resource, SyncResource, blocking, call


class _Files(Resource):
    """The behaviour of ``files``, for :class:`Files` and :class:`AsyncFiles`."""

    def _validate(
        self,
        path: str | os.PathLike[str],
        *,
        model: str | None,
        epochs: int = 1,
        max_seq_length: int | None = None,
        workers: int | None = None,
    ) -> DatasetReport:
        from ..datasets import counter_for, validate

        return validate(
            path,
            model=model,
            epochs=epochs,
            max_seq_length=max_seq_length,
            counter=counter_for(self._tokenizer_dir(model)),
            workers=workers,
        )

    def _upload(self, path: str | os.PathLike[str], model: str | None) -> Op[FileObject]:
        with self._staging() as folder:
            copy: Path = yield Blocking(lambda: _copy_dataset(path, folder))
            stored: FileObject = yield from self._store_copy(copy, str(path), model, None)
            return stored

    def _store_copy(self, copy: Path, label: str, model: str | None, workers: int | None) -> Op[FileObject]:
        report: DatasetReport = yield Blocking(lambda: self._validate(copy, model=model, workers=workers))
        if not report.ok:
            raise DatasetError(label, report.errors, total=max(report.error_count, 1))
        stored: FileObject = yield Call(lambda b: b.upload_file(str(copy), report=report))
        return stored

    def _staging(self) -> AbstractContextManager[Path]:
        """Where an upload's private copy lies: the backend's own place (the local home), else a temporary folder."""
        if self._capabilities.staging:
            return cast(StagingBackend, self._client.backend).staging()
        return _temporary_folder()

    def _tokenizer_dir(self, model: str | None) -> Path | None:
        """A folder holding the model's tokenizer.json on this machine, if there is one (no download)."""
        if model is None:
            return None
        entry = catalog.find(model)
        if entry is not None and entry.hf_id is None:
            return self._client.home / "models" / "base" / entry.name
        folder = Path(model).expanduser()
        if folder.is_dir():
            return folder
        repo = entry.hf_id if entry is not None and entry.hf_id else model
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        cached = try_to_load_from_cache(repo, "tokenizer.json")
        return Path(cached).parent if isinstance(cached, str) else None


class Files(_Files, SyncResource):
    """Datasets: validate locally, then upload to the backend."""

    def validate(
        self,
        path: str | os.PathLike[str],
        *,
        model: str | None = None,
        epochs: int = 1,
        max_seq_length: int | None = None,
        workers: int | None = None,
    ) -> DatasetReport:
        """Check every line of a JSONL dataset in one streaming pass: every problem with its line number, token
        statistics (exact with the model's tokenizer where it is on this machine) and the trained-token estimate.
        Files over 32 MiB are checked in ``workers`` processes (default: one per CPU, up to 4)."""
        return self._validate(path, model=model, epochs=epochs, max_seq_length=max_seq_length, workers=workers)

    def upload(self, path: str | os.PathLike[str], *, model: str | None = None) -> FileObject:
        """Validate, then store the dataset. The file is read once, into a private copy (a regular file only: anything
        else is a :class:`~phitune.errors.DatasetError`, ``not_a_file``), and that copy is both validated and stored,
        so what is stored is what was validated. A file with any problem raises
        :class:`~phitune.errors.DatasetError` and is not stored."""
        return self._run(self._upload(path, model))

    def store_copy(self, copy: Path, *, label: str, model: str | None = None, workers: int | None = None) -> FileObject:
        """Validate and store a private copy of a dataset, the second half of :meth:`upload` (``phitune serve``
        receives an upload straight into the backend's staging folder): a copy with any problem raises
        :class:`~phitune.errors.DatasetError` naming it ``label`` and is not stored."""
        return self._run(self._store_copy(copy, label, model, workers))

    def get(self, file_id: str) -> FileObject:
        """A stored file by id."""
        return self._run(call(lambda b: b.get_file(file_id)))

    def list(self) -> builtins.list[FileObject]:
        """Every stored file."""
        return self._run(call(lambda b: b.list_files()))

    def delete(self, file_id: str) -> None:
        """Delete a stored file."""
        self._run(call(lambda b: b.delete_file(file_id)))


class AsyncFiles(_Files, AsyncResource):
    """:class:`Files` for ``AsyncClient``: validation runs on a worker thread."""

    async def validate(
        self,
        path: str | os.PathLike[str],
        *,
        model: str | None = None,
        epochs: int = 1,
        max_seq_length: int | None = None,
        workers: int | None = None,
    ) -> DatasetReport:
        """:meth:`Files.validate`."""
        report: DatasetReport = await self._run(
            blocking(
                lambda: self._validate(path, model=model, epochs=epochs, max_seq_length=max_seq_length, workers=workers)
            )
        )
        return report

    async def upload(self, path: str | os.PathLike[str], *, model: str | None = None) -> FileObject:
        """:meth:`Files.upload`."""
        return await self._run(self._upload(path, model))

    async def get(self, file_id: str) -> FileObject:
        """A stored file by id."""
        return await self._run(call(lambda b: b.get_file(file_id)))

    async def list(self) -> builtins.list[FileObject]:
        """Every stored file."""
        return await self._run(call(lambda b: b.list_files()))

    async def delete(self, file_id: str) -> None:
        """Delete a stored file."""
        await self._run(call(lambda b: b.delete_file(file_id)))


@contextmanager
def _temporary_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="phitune-upload-") as folder:
        yield Path(folder)


def _copy_dataset(path: str | os.PathLike[str], folder: Path) -> Path:
    """Copy a dataset file into ``folder`` under its own name, in one read."""
    from ..datasets import open_dataset

    target = folder / Path(path).name
    with open_dataset(path) as source, open(target, "xb") as copy:
        shutil.copyfileobj(source, copy, 1 << 20)
    return target
