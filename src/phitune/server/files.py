"""``/v1/files``: datasets, in OpenAI's file shapes. An upload streams straight into the store's staging folder
(:mod:`._upload`, size-limited) and is validated and stored there by the client's
:meth:`~phitune.resources.files.Files.store_copy`, as ``client.files.upload`` does."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from .. import openai_shapes as shapes
from ..errors import SpecError
from ..types import FileObject
from ._upload import receive_upload
from .deps import BackendDep, StateDep, list_response, page

router = APIRouter(prefix="/v1/files")


@router.post("")
async def create_file(request: Request, state: StateDep) -> dict[str, Any]:
    with state.backend.staging() as folder:
        upload = await receive_upload(request, folder, file_field="file", max_bytes=state.max_upload_bytes)
        purpose = upload.fields.get("purpose", "fine-tune")
        if purpose != "fine-tune":
            raise SpecError("purpose", f"{purpose!r}: this server stores 'fine-tune' files only")

        def store() -> FileObject:
            # in this process: forking a server's threads (event loop, thread pool) for a parallel pass is unsafe
            return state.client.files.store_copy(upload.path, label=upload.filename, workers=1)

        return shapes.file_to_openai(await run_in_threadpool(store))


@router.get("")
def list_files(
    backend: BackendDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> dict[str, Any]:
    files = [f for f in backend.list_files() if purpose is None or f.purpose == purpose]
    if order == "asc":
        files.reverse()
    found, more = page(files, [f.id for f in files], after, limit)
    return list_response([shapes.file_to_openai(f) for f in found], has_more=more)


@router.get("/{file_id}")
def get_file(file_id: str, backend: BackendDep) -> dict[str, Any]:
    return shapes.file_to_openai(backend.get_file(file_id))


@router.delete("/{file_id}")
def delete_file(file_id: str, backend: BackendDep) -> dict[str, Any]:
    backend.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/{file_id}/content")
def file_content(file_id: str, backend: BackendDep) -> FileResponse:
    return FileResponse(backend.file_content(file_id), media_type="application/octet-stream")
