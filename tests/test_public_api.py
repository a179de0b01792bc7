"""The public surface: every exported name resolves, ``import phitune`` stays light, and the error tree keeps its
promises (a remote 404 is a NotFoundError with a NotFoundError's attributes)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import phitune
from conftest import child_env
from phitune import errors
from phitune.backends.base import Capabilities


def test_every_public_name_resolves_and_every_error_is_exported() -> None:
    for name in phitune.__all__:
        assert getattr(phitune, name) is not None, name
    raised = {
        name for name, value in vars(errors).items() if inspect.isclass(value) and value.__module__ == errors.__name__
    }
    assert raised <= set(phitune.__all__)
    assert {"AsyncClient", "Estimate", "WontFitError", "JobOptions", "RetryPolicy", "Capabilities"} <= set(
        phitune.__all__
    )
    assert phitune.Estimate.__name__ == "Estimate" and "Estimate" in dir(phitune)
    with pytest.raises(AttributeError):
        _ = phitune.NoSuchName  # type: ignore[attr-defined]


def test_import_phitune_loads_no_heavy_module() -> None:
    heavy = ["torch", "transformers", "peft", "azure", "openai", "tenacity"]
    script = f"import sys, phitune; print(__import__('json').dumps([m for m in {heavy!r} if m in sys.modules]))"
    loaded = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, check=True)
    assert json.loads(loaded.stdout) == []


def test_a_remote_404_is_a_not_found_error_with_its_attributes() -> None:
    error = errors.status_error(404, "no such job", request_id="req-1", ident="/v1/fine_tuning/jobs/ftjob-9")
    assert isinstance(error, errors.RemoteNotFoundError) and isinstance(error, errors.NotFoundError)
    assert (error.status_code, error.request_id, error.message) == (404, "req-1", "404: no such job")
    try:
        raise error
    except errors.NotFoundError as found:  # one except for local and remote
        assert found.kind == "resource" and found.ident == "/v1/fine_tuning/jobs/ftjob-9"
    assert errors.status_error(404, "gone").ident == ""  # type: ignore[attr-defined]
    assert errors.RemoteNotFoundError("x", status_code=404, kind="deployment", ident="d").kind == "deployment"


def test_a_missing_capability_names_the_backend_and_what_to_use_instead() -> None:
    Capabilities(pause=True).require("pause", "pause", "local")  # present: nothing raised
    with pytest.raises(errors.UnsupportedOptionError) as refused:
        Capabilities().require("chat_streaming", "deployments.stream_chat", "azure")
    assert refused.value.field == "deployments.stream_chat" and refused.value.backend == "azure"
    assert "not supported by the azure backend" in str(refused.value) and "deployments.chat()" in str(refused.value)
