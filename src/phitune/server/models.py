"""``/v1/models`` and ``/v1/phitune/deployments``: the models this server can train and serve, and the deployments
that serve them (a deployment answers ``/v1/chat/completions`` by its name)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from .. import openai_shapes as shapes
from ..backends.local import LocalBackend
from ..errors import NotFoundError, SpecError
from .deps import BackendDep, check_model, list_response

router = APIRouter()


class DeploymentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    name: str
    engine: str = "torch"


@router.get("/v1/models")
def list_models(backend: BackendDep) -> dict[str, Any]:
    return list_response([shapes.model_to_openai(m) for m in backend.list_models()])


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, backend: BackendDep) -> dict[str, Any]:
    try:
        check_model(backend, model_id)
    except SpecError:
        raise NotFoundError("model", model_id) from None
    return shapes.model_to_openai(backend.get_model(model_id))


def _deployment_json(backend: LocalBackend, request: Request, name: str) -> dict[str, Any]:
    deployment = backend.get_deployment(name)
    endpoint = f"{str(request.base_url).rstrip('/')}/v1"
    return {"object": "phitune.deployment", **deployment.model_dump(mode="json"), "endpoint": endpoint}


@router.post("/v1/phitune/deployments")
def create_deployment(body: DeploymentRequest, request: Request, backend: BackendDep) -> dict[str, Any]:
    check_model(backend, body.model)
    backend.create_deployment(body.model, body.name, engine=body.engine)
    return _deployment_json(backend, request, body.name)


@router.get("/v1/phitune/deployments")
def list_deployments(request: Request, backend: BackendDep) -> dict[str, Any]:
    return list_response([_deployment_json(backend, request, d.name) for d in backend.list_deployments()])


@router.get("/v1/phitune/deployments/{name}")
def get_deployment(name: str, request: Request, backend: BackendDep) -> dict[str, Any]:
    return _deployment_json(backend, request, name)


@router.delete("/v1/phitune/deployments/{name}")
def delete_deployment(name: str, backend: BackendDep) -> dict[str, Any]:
    backend.delete_deployment(name)
    return {"id": name, "object": "phitune.deployment", "deleted": True}
