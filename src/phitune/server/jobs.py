"""``/v1/fine_tuning/jobs``: fine-tuning jobs in OpenAI's shapes (:mod:`phitune.openai_shapes`), plus phitune's pause
and resume."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query

from .. import openai_shapes as shapes
from ..backends.local import LocalBackend
from ..errors import ConflictError, SpecError
from ..types import JobEvent
from .deps import BackendDep, ClientDep, check_model, list_response, page

router = APIRouter(prefix="/v1/fine_tuning/jobs")
_EVENT_ID = re.compile(r"^ftevent-\d+$")


@router.post("")
def create_job(
    body: shapes.JobCreateRequest,
    backend: BackendDep,
    client: ClientDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    spec, origin = shapes.spec_from_request(body)
    try:
        check_model(backend, spec.model)
        job = client.finetune.submit(spec, idempotency_key=idempotency_key)
    except SpecError as exc:
        exc.field = shapes.request_param(exc.field, origin)
        raise
    if job.spec is not None and job.spec.model_dump() != spec.model_dump():
        raise ConflictError(f"Idempotency-Key {idempotency_key!r} was used for job {job.id} with other options")
    return shapes.job_to_openai(job)


@router.get("")
def list_jobs(
    backend: BackendDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> dict[str, Any]:
    jobs = backend.list_jobs(limit=limit + 1, after=after)
    return list_response([shapes.job_to_openai(j) for j in jobs[:limit]], has_more=len(jobs) > limit)


@router.get("/{job_id}")
def get_job(job_id: str, backend: BackendDep) -> dict[str, Any]:
    return shapes.job_to_openai(backend.get_job(job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, backend: BackendDep) -> dict[str, Any]:
    return shapes.job_to_openai(backend.cancel_job(job_id))


@router.post("/{job_id}/pause")
def pause_job(job_id: str, backend: BackendDep) -> dict[str, Any]:
    return shapes.job_to_openai(backend.pause_job(job_id))


@router.post("/{job_id}/resume")
def resume_job(job_id: str, backend: BackendDep) -> dict[str, Any]:
    return shapes.job_to_openai(backend.resume_job(job_id))


@router.get("/{job_id}/events")
def list_events(
    job_id: str,
    backend: BackendDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    """Newest first, as OpenAI; ``order=asc`` (a phitune extension) pages oldest first from ``after``."""
    if after is not None and not _EVENT_ID.match(after):
        raise SpecError("after", f"{after!r} is not an event id")
    if order == "asc":
        events = backend.list_events(job_id, after=after, limit=limit + 1)
        found, more = events[:limit], len(events) > limit
    else:
        newest_first = _all_events(backend, job_id)[::-1]
        found, more = page(newest_first, [e.id for e in newest_first], after, limit)
    return list_response([shapes.event_to_openai(e) for e in found], has_more=more)


def _all_events(backend: LocalBackend, job_id: str) -> list[JobEvent]:
    events: list[JobEvent] = []
    while True:
        batch = backend.list_events(job_id, after=events[-1].id if events else None, limit=1000)
        events.extend(batch)
        if len(batch) < 1000:
            return events


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str, backend: BackendDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 10
) -> dict[str, Any]:
    checkpoints = backend.list_checkpoints(job_id)
    found, more = page(checkpoints, [c.id for c in checkpoints], after, limit)
    return list_response([shapes.checkpoint_to_openai(c) for c in found], has_more=more)
