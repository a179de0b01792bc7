from __future__ import annotations

import builtins
import os
from pathlib import Path

from ..errors import UnsupportedOptionError
from ..export import AdapterMode, Device, ExportFormat, Precision
from ..types import ModelObject
from ._base import Resource


class Models(Resource):
    """Base and fine-tuned models."""

    def get(self, model_id: str) -> ModelObject:
        """A model by id (``path`` is its folder on the local backend)."""
        return self._backend.get_model(model_id)

    def list(self) -> builtins.list[ModelObject]:
        """Every model the backend knows: the built-in bases and the fine-tunes."""
        return self._backend.list_models()

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
        """
        exporter = getattr(self._backend, "export_model", None)
        if exporter is None:
            raise UnsupportedOptionError(
                "models.export", self._backend.name, "exports need the model's weights on this machine (local backend)"
            )
        path: Path = exporter(
            model,
            format=format,
            dest=dest,
            precision=precision,
            device=device,
            adapters=adapters,
            verify=verify,
            overwrite=overwrite,
        )
        return path
