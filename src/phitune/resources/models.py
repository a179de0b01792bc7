from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import cast

from .._ops import Op
from ..backends.base import ExportingBackend
from ..export import AdapterMode, Device, ExportFormat, Precision
from ..types import ModelObject
from ._base import AsyncResource, Call, Resource, SyncResource, call


class _Models(Resource):
    """The behaviour of ``models``, for :class:`Models` and :class:`AsyncModels`."""

    def _export(
        self,
        model: str,
        format: ExportFormat,
        dest: str | os.PathLike[str],
        precision: Precision,
        device: Device,
        adapters: AdapterMode,
        verify: bool,
        overwrite: bool,
    ) -> Op[Path]:
        self._require("export", "models.export")
        path: Path = yield Call(
            lambda b: cast(ExportingBackend, b).export_model(
                model,
                format=format,
                dest=dest,
                precision=precision,
                device=device,
                adapters=adapters,
                verify=verify,
                overwrite=overwrite,
            )
        )
        return path


class Models(_Models, SyncResource):
    """Base and fine-tuned models."""

    def get(self, model_id: str) -> ModelObject:
        """A model by id (``path`` is its folder on the local backend)."""
        return self._run(call(lambda b: b.get_model(model_id)))

    def list(self) -> builtins.list[ModelObject]:
        """Every model the backend knows: the built-in bases and the fine-tunes."""
        return self._run(call(lambda b: b.list_models()))

    def export(
        self,
        model: str,
        *,
        format: ExportFormat,
        dest: str | os.PathLike[str],
        precision: Precision = "fp32",
        device: Device = "cpu",
        adapters: AdapterMode = "merged",
        verify: bool = True,
        overwrite: bool = False,
    ) -> Path:
        """Export ``model`` to the folder ``dest`` and return its path.

        ``format``: ``"adapter"`` (the PEFT folder), ``"merged"`` (a transformers folder with the adapter merged in)
        or ``"onnx"`` (an ONNX Runtime GenAI folder; ``precision`` and ``device`` choose the build). For a LoRA
        fine-tune, ``adapters="separate"`` keeps the adapter out of the ONNX base as ``<name>.onnx_adapter``;
        exporting more fine-tunes of that base into the same ``dest`` adds their adapter files. The export is checked
        against PyTorch (``verify``) and ``export_report.json`` records the result. See :mod:`phitune.export`.
        Raises :class:`~phitune.errors.UnsupportedOptionError` on a backend whose weights are not on this machine.
        """
        return self._run(self._export(model, format, dest, precision, device, adapters, verify, overwrite))


class AsyncModels(_Models, AsyncResource):
    """:class:`Models` for ``AsyncClient``."""

    async def get(self, model_id: str) -> ModelObject:
        """:meth:`Models.get`."""
        return await self._run(call(lambda b: b.get_model(model_id)))

    async def list(self) -> builtins.list[ModelObject]:
        """Every model the backend knows: the built-in bases and the fine-tunes."""
        return await self._run(call(lambda b: b.list_models()))

    async def export(
        self,
        model: str,
        *,
        format: ExportFormat,
        dest: str | os.PathLike[str],
        precision: Precision = "fp32",
        device: Device = "cpu",
        adapters: AdapterMode = "merged",
        verify: bool = True,
        overwrite: bool = False,
    ) -> Path:
        """:meth:`Models.export`, on a worker thread."""
        return await self._run(self._export(model, format, dest, precision, device, adapters, verify, overwrite))
