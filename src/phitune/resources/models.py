from __future__ import annotations

import builtins

from ..types import ModelObject
from ._base import Resource


class Models(Resource):
    """Base and fine-tuned models."""

    def get(self, model_id: str) -> ModelObject:
        """A model by id (``path`` is its folder on the local backend)."""
        return self._backend.get_model(model_id)

    def list(self) -> builtins.list[ModelObject]:
        return self._backend.list_models()
