"""The web dashboard of ``phitune serve``: a static page at ``/`` and the two routes only it needs.

The page (``static/``: plain HTML, CSS and JavaScript, no build step, charts drawn as inline SVG) loads without the API
key, asks for it once and keeps it in the browser tab's ``sessionStorage``; every API call it makes sends it in the
``Authorization`` header, as any client does. The routes added here sit under ``/v1`` with the others and need the key:

- ``POST /v1/phitune/files/validate``: the validation report of an uploaded dataset (every problem with its line,
  token counts), stored nowhere;
- ``POST /v1/phitune/models/{id}/export``: a fine-tuned model of this home exported (``adapter``, ``merged`` or
  ``onnx``) and sent back as a zip file.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from .. import catalog
from ..errors import NotFoundError, SpecError
from ..export import ExportFormat
from ._upload import receive_upload
from .deps import StateDep

STATIC = Path(str(resources.files("phitune.server") / "static"))
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
"""Sent with the page: its own scripts and styles only, no framing, no referrer."""
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: ExportFormat = "adapter"


router = APIRouter()
"""The dashboard's API routes, under the app's auth like the others."""


def add_dashboard(app: FastAPI) -> None:
    """Serve the dashboard page and its static files without auth, and add its API routes (under the app's auth)."""

    async def page(_: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.add_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/dashboard", StaticFiles(directory=STATIC), name="dashboard")
    app.include_router(router)


@router.post("/v1/phitune/files/validate")
async def validate_file(request: Request, state: StateDep) -> dict[str, Any]:
    """Validate an uploaded dataset as ``POST /v1/files`` would (form field ``file``; ``model``, a catalog name,
    counts tokens with its tokenizer), without storing it."""
    with tempfile.TemporaryDirectory(dir=state.uploads) as folder:
        upload = await receive_upload(request, Path(folder), file_field="file", max_bytes=state.max_upload_bytes)
        model = upload.fields.get("model") or None
        if model is not None and catalog.find(model) is None:
            raise SpecError("model", f"{model!r} is not a catalog model")
        report = await run_in_threadpool(state.client.files.validate, upload.path, model=model, workers=1)
    return {**report.model_dump(mode="json"), "path": upload.filename}


@router.post("/v1/phitune/models/{model_id:path}/export")
def export_model(model_id: str, body: ExportRequest, state: StateDep) -> FileResponse:
    """A fine-tuned model of this home, exported and zipped."""
    backend = state.backend
    if backend.store.find_model(model_id) is None:
        raise NotFoundError("fine-tuned model", model_id)
    work = Path(tempfile.mkdtemp(dir=state.uploads))
    try:
        exported = state.client.models.export(model_id, format=body.format, dest=work / "export")
        if body.format == "adapter":
            _name_base_publicly(exported / "adapter_config.json", backend.get_model(model_id).base_model)
        name = f"{_UNSAFE_NAME.sub('_', model_id).strip('._')}-{body.format}"
        archive = shutil.make_archive(str(work / name), "zip", root_dir=exported)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FileResponse(
        archive,
        media_type="application/zip",
        filename=f"{name}.zip",
        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
    )


def _name_base_publicly(adapter_config: Path, base: str | None) -> None:
    """Name an exported adapter's base model by its public id (the catalog's Hugging Face id, else its name), not by
    its folder on this server."""
    entry = catalog.find(base) if base is not None else None
    config = json.loads(adapter_config.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = entry.hf_id if entry is not None and entry.hf_id else base
    adapter_config.write_text(json.dumps(config, indent=2), encoding="utf-8")
