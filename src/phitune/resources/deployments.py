from __future__ import annotations

import builtins
from typing import Any

from ..types import Deployment
from ._base import Resource


class Deployments(Resource):
    """Serve models for chat: ``dep = client.deployments.create(model=..., name=...)`` then ``dep.chat(...)``."""

    def create(self, *, model: str, name: str, **options: Any) -> Deployment:
        """Deploy ``model`` under ``name``. Backend options (e.g. Azure's region) go in ``options``."""
        return self._backend.create_deployment(model, name, **options).bind(self._backend)

    def get(self, name: str) -> Deployment:
        """A deployment by name, ready to ``chat``."""
        return self._backend.get_deployment(name).bind(self._backend)

    def list(self) -> builtins.list[Deployment]:
        """Every deployment of the backend."""
        return [d.bind(self._backend) for d in self._backend.list_deployments()]

    def delete(self, name: str) -> None:
        """Delete a deployment; the model it serves stays."""
        self._backend.delete_deployment(name)
