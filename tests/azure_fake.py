"""A fake Azure for offline tests, played under the real azure-ai-ml code.

:class:`FakeAzure` is an azure-core ``HttpTransport`` that answers the ARM, Azure ML and blob storage REST calls
azure-ai-ml and azure-storage-blob make (workspace, default datastore and its secrets, blob uploads, registry discovery
and models, data assets, compute clusters, FineTuning jobs, run history, registered models, serverless endpoints,
managed online endpoints and deployments, and their keys, and the workspace's MLflow tracking server's runs and
metric histories) from in-memory state that tests drive (``set_job_status``),
records every request, and can inject faults (``fail``). Like the real service it refuses what Azure refuses: a
serverless job with a hyperparameter its MaaS notebook does not name, a serverless job on a model whose registry tags
say its fine-tuning retired, a serverless deployment of a model fine-tuned on managed compute, and a second
serverless deployment of one fine-tuned model. :class:`ChatServer` is a real HTTP server on 127.0.0.1 standing in for
an endpoint's OpenAI-compatible ``/v1/chat/completions`` route, checking the endpoint key.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.exceptions import ServiceResponseError
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest
from azure.core.rest._http_response_impl import HttpResponseImpl

SUBSCRIPTION = "00000000-0000-0000-0000-0000000000a1"
RESOURCE_GROUP = "rg-phitune"
WORKSPACE = "proj-phitune"
WORKSPACE_GUID = "6f1d3c2b-0000-4000-8000-00000000c0de"
WORKSPACE_PATH = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
)
REGISTRY_SUBSCRIPTION = "00000000-0000-0000-0000-0000000000b2"
REGISTRY_HOST = "https://cert-eastus.experiments.azureml.net"
REGISTRY_PATH = (
    f"/mferp/managementfrontend/subscriptions/{REGISTRY_SUBSCRIPTION}/resourceGroups/registry-rg"
    "/providers/Microsoft.MachineLearningServices/registries/azureml"
)
AAD_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJmYWtlLWF1ZGllbmNlIn0.c2lnbmF0dXJlLWZha2U"
ENDPOINT_KEY = "fake-endpoint-key-7f3a9c21d4e84b6b"
STORAGE_ACCOUNT = "phitunestore"
STORAGE_KEY = "ZmFrZS1zdG9yYWdlLWFjY291bnQta2V5LTAwMDA="
# The registry's tags for a retired Phi-3 model (Azure/azureml-assets phi-3-mini-4k-instruct spec.yaml, version 15).
PHI3_TAGS = {
    "maas-finetuning-deploy-regions": "eastus2",
    "task": "chat-completion",
    "InferenceLegacyDate": "2025-06-09",
    "InferenceDeprecationDate": "2025-06-30",
    "InferenceRetirementDate": "2025-08-30",
    "FinetuneDeprecationDate": "2025-06-30",
    "FinetuneRetirementDate": "2025-08-30",
    "finetune_compute_allow_list": "[Standard_NC24ads_A100_v4, Standard_NC48ads_A100_v4, Standard_NC96ads_A100_v4, "
    "Standard_ND96asr_v4, Standard_ND96amsr_A100_v4]",
    "model_specific_defaults": "{'apply_lora': 'true', 'learning_rate': '5e-6', 'learning_rate_min': '5e-7', "
    "'learning_rate_max': '5e-5', 'lr_scheduler_type': 'cosine', 'gradient_accumulation_steps': '1'}",
}
# Tags of a live model, in the registry's shapes (the values are this fake's).
PHI4_MINI_TAGS = {
    "maas-finetuning-deploy-regions": "eastus2,eastus,northcentralus,southcentralus,westus,westus3",
    "task": "chat-completion",
    "finetune_compute_allow_list": "['Standard_NC24ads_A100_v4', 'Standard_NC48ads_A100_v4', "
    "'Standard_NC96ads_A100_v4', 'Standard_ND96amsr_A100_v4']",
    "model_specific_defaults": "{'apply_lora': 'true', 'learning_rate': '2e-5', 'learning_rate_min': '2e-6', "
    "'learning_rate_max': '2e-4', 'lr_scheduler_type': 'cosine', 'gradient_accumulation_steps': '1'}",
}
SERVERLESS_HYPERPARAMETERS = {"per_device_train_batch_size", "learning_rate", "num_train_epochs"}
_FLAVORS = {"python_function": {"data": {"loader_module": "mlflow.transformers"}}}
_EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


class FakeCredential:
    """A ``TokenCredential`` handing out a fixed, fake AAD token."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(AAD_TOKEN, int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        return AccessTokenInfo(AAD_TOKEN, int(time.time()) + 3600)


@dataclass
class Recorded:
    """One request as it reached the wire."""

    method: str
    url: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    headers: dict[str, str]
    times: int
    after_processing: bool = False
    message: str = "fault"


class _Raw:
    def close(self) -> None:
        pass


def _response(request: HttpRequest, status: int, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    response = HttpResponseImpl(
        request=request,
        internal_response=_Raw(),
        status_code=status,
        reason="fake",
        content_type="application/json",
        headers={"Content-Type": "application/json", "x-ms-request-id": "req-0001", **(headers or {})},
        stream_download_generator=None,
    )
    response._content = b"" if body is None else json.dumps(body).encode()
    return response


def _error(request: HttpRequest, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    return _response(request, status, {"error": {"code": code, "message": message}}, headers)


def _mlflow_error(request: HttpRequest, status: int, code: str, message: str) -> Any:
    return _response(request, status, {"error_code": code, "message": message})


def _page(items: list[Any], token: str | None, size: int) -> tuple[list[Any], str | None]:
    start = int(token or 0)
    return items[start : start + size], str(start + size) if start + size < len(items) else None


@dataclass
class FakeAzure(HttpTransport):  # type: ignore[misc]
    """The Azure services azure-ai-ml talks to, in memory. ``location`` is the workspace region."""

    location: str = "eastus2"
    kind: str = "Project"
    workspace_guid: str = WORKSPACE_GUID
    registry_models: dict[str, dict[str, dict[str, str]]] = field(
        default_factory=lambda: {
            "Phi-4-mini-instruct": {"3": dict(PHI4_MINI_TAGS), "4": dict(PHI4_MINI_TAGS)},
            **{name: {"15": dict(PHI3_TAGS)} for name in ("Phi-3-mini-4k-instruct", "Phi-3-medium-4k-instruct")},
        }
    )
    computes: dict[str, str] = field(default_factory=lambda: {"gpu-cluster": "Standard_NC96ads_A100_v4"})
    blobs: dict[str, bytes] = field(default_factory=dict)
    online_endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    online_deployments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    scoring_uri: str = "https://phitune-ep.eastus2.models.ai.azure.com"
    endpoint_polls: int = 1
    requests: list[Recorded] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    data: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlflow_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlflow_page_size: int = 2
    _ticks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------------------------------- test controls
    def fail(
        self,
        method: str,
        pattern: str,
        *,
        status: int = 429,
        headers: dict[str, str] | None = None,
        times: int = 1,
        after_processing: bool = False,
        message: str = "fault",
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (0: drop the connection). With
        ``after_processing`` the request takes effect first and only the answer is lost."""
        self.faults.append(Fault(method, re.compile(pattern), status, headers or {}, times, after_processing, message))

    def sent(self, method: str, pattern: str) -> list[Recorded]:
        """Recorded requests with this method whose path matches ``pattern``."""
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def set_job_status(
        self, name: str, status: str, *, error: dict[str, Any] | None = None, warnings: Sequence[dict[str, str]] = ()
    ) -> None:
        """Move a job to an Azure status; Completed registers its output model (version 1)."""
        job, run = self.jobs[name], self.runs[name]
        now = self._now()
        job["properties"]["status"] = status
        run.update(status=status, lastModifiedUtc=now)
        if status == "Running" and "startTimeUtc" not in run:
            run["startTimeUtc"] = now
        if status in ("Completed", "Failed", "Canceled", "NotResponding"):
            run["endTimeUtc"] = now
        if error is not None:
            run["error"] = {"error": error}
        if warnings:
            run["warnings"] = list(warnings)
        if status == "Completed":
            output = job["properties"]["outputs"]["registered_model"]["assetName"]
            model_id = f"{WORKSPACE_PATH}/models/{output}/versions/1"
            self.models[(output, "1")] = {
                "id": model_id,
                "name": "1",
                "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
                "properties": {
                    "modelType": "mlflow_model",
                    "modelUri": f"azureml://jobs/{name}/outputs/registered_model",
                    "flavors": _FLAVORS,
                    "jobName": name,
                    "tags": {},
                    "properties": {},
                    "isArchived": False,
                },
                "systemData": self._system_data(),
            }

    def log_metrics(self, job: str, step: int, metrics: dict[str, float], *, step_run: str | None = None) -> None:
        """Log metric values at ``step`` to the job's MLflow run, or to its child run ``step_run`` (a pipeline step,
        created on first use), as Hugging Face Trainer's MLflow callback does."""
        run_id = job if step_run is None else f"{job}_{step_run}"
        experiment = self.jobs[job]["properties"].get("experimentName", "Default")
        run = self.mlflow_runs.setdefault(
            run_id, {"experiment": experiment, "parent": None if step_run is None else job, "history": []}
        )
        stamp = int((_EPOCH + timedelta(seconds=step)).timestamp() * 1000)
        run["history"].extend({"key": k, "value": v, "step": step, "timestamp": stamp} for k, v in metrics.items())

    # ---------------------------------------------------------------------------------------- transport
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeAzure:
        return self

    def __exit__(self, *args: object) -> None:
        pass

    def send(self, request: HttpRequest, **kwargs: Any) -> Any:
        with self._lock:
            parts = urlsplit(request.url)
            content = request.content
            try:
                body = json.loads(content) if content else None
            except (ValueError, UnicodeDecodeError):
                body = content  # a blob's bytes
            self.requests.append(
                Recorded(
                    request.method,
                    request.url,
                    parts.path,
                    dict(parse_qsl(parts.query)),
                    dict(request.headers),
                    body,
                )
            )
            fault = self._fault(request.method, parts.path)
            if fault is not None and not fault.after_processing:
                return self._fault_response(request, fault)
            response = self._route(request, parts.scheme + "://" + parts.netloc, parts.path, body)
            if fault is not None:
                return self._fault_response(request, fault)
            return response

    def _fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                fault.times -= 1
                return fault
        return None

    def _fault_response(self, request: HttpRequest, fault: Fault) -> Any:
        if fault.status == 0:
            raise ServiceResponseError("Connection reset by peer")
        code = "TooManyRequests" if fault.status == 429 else "Fault"
        return _error(request, fault.status, code, fault.message, fault.headers)

    # ------------------------------------------------------------------------------------------- routing
    def _route(self, request: HttpRequest, host: str, path: str, body: Any) -> Any:
        method = request.method
        if host == f"https://{STORAGE_ACCOUNT}.blob.core.windows.net":
            return self._blob(request, path, body)
        if path.endswith("/registrymanagement/v1.0/registries/azureml/discovery"):
            return _response(
                request,
                200,
                {
                    "registryName": "azureml",
                    "primaryRegion": "eastus",
                    "regions": ["eastus"],
                    "primaryRegionResourceProviderUri": f"{REGISTRY_HOST}/",
                    "subscriptionId": REGISTRY_SUBSCRIPTION,
                    "resourceGroup": "registry-rg",
                },
            )
        if path == "/discovery":
            urls = {key: host for key in ("api", "history", "catalog", "experimentation", "modelmanagement")}
            return _response(request, 200, urls)
        if path.startswith(REGISTRY_PATH + "/models/"):
            return self._registry(request, path[len(REGISTRY_PATH + "/models/") :].split("/"))
        history = f"/history/v1.0{WORKSPACE_PATH}/runs/"
        if path.startswith(history) and path.endswith("/details"):
            run = self.runs.get(path[len(history) : -len("/details")])
            return _response(request, 200, run) if run else _error(request, 404, "RunNotFound", "no such run")
        if path == WORKSPACE_PATH and method == "GET":
            return _response(request, 200, self._workspace())
        mlflow = f"/mlflow/v2.0{WORKSPACE_PATH}/api/2.0/mlflow/"
        if host == f"https://{self.location}.api.azureml.ms" and path.startswith(mlflow):
            return self._mlflow(request, path[len(mlflow) :], body)
        if not path.startswith(WORKSPACE_PATH + "/"):
            return _error(request, 404, "NotFound", f"fake Azure has no route for {method} {path}")
        segments = path[len(WORKSPACE_PATH) + 1 :].split("/")
        handler = {
            "data": self._data,
            "datastores": self._datastores,
            "computes": self._computes,
            "jobs": self._jobs,
            "models": self._models,
            "serverlessEndpoints": self._endpoints,
            "onlineEndpoints": self._online,
        }.get(segments[0])
        if handler is None:
            return _error(request, 404, "NotFound", f"fake Azure has no route for {method} {path}")
        return handler(request, segments[1:], body)

    def _workspace(self) -> dict[str, Any]:
        properties = {
            "workspaceId": self.workspace_guid,
            "friendlyName": WORKSPACE,
            "discoveryUrl": f"https://{self.location}.api.azureml.ms/discovery",
            "mlFlowTrackingUri": f"azureml://{self.location}.api.azureml.ms/mlflow/v1.0{WORKSPACE_PATH}",
        }
        if self.kind == "Project":
            properties["hubResourceId"] = (
                f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
                "/providers/Microsoft.MachineLearningServices/workspaces/hub-phitune"
            )
        return {
            "id": WORKSPACE_PATH,
            "name": WORKSPACE,
            "type": "Microsoft.MachineLearningServices/workspaces",
            "location": self.location,
            "kind": self.kind,
            "properties": properties,
        }

    def _mlflow(self, request: HttpRequest, route: str, body: Any) -> Any:
        """MLflow REST API 2.0: experiments/get-by-name, runs/get, runs/search (by parent run), metrics/get-history,
        paged by ``mlflow_page_size``; an AAD bearer token is required."""
        if request.headers.get("Authorization") != f"Bearer {AAD_TOKEN}":
            return _mlflow_error(request, 401, "UNAUTHENTICATED", "missing or wrong bearer token")
        query = dict(parse_qsl(urlsplit(request.url).query))
        experiments = {run["experiment"] for run in self.mlflow_runs.values()}
        if route == "experiments/get-by-name":
            name = query.get("experiment_name", "")
            if name not in experiments:
                return _mlflow_error(request, 404, "RESOURCE_DOES_NOT_EXIST", f"no experiment {name}")
            return _response(request, 200, {"experiment": {"experiment_id": f"exp-{name}", "name": name}})
        if route == "runs/search":
            parent = re.fullmatch(r"tags\.mlflow\.parentRunId = '([^']+)'", body.get("filter", ""))
            found = [
                run_id
                for run_id, run in sorted(self.mlflow_runs.items())
                if parent and run["parent"] == parent[1] and f"exp-{run['experiment']}" in body["experiment_ids"]
            ]
            page, token = _page(found, body.get("page_token"), self.mlflow_page_size)
            runs = [{"info": {"run_id": run_id}} for run_id in page]
            return _response(request, 200, {"runs": runs, **({"next_page_token": token} if token else {})})
        run = self.mlflow_runs.get(query.get("run_id", ""))
        if run is None:
            return _mlflow_error(request, 404, "RESOURCE_DOES_NOT_EXIST", f"no run {query.get('run_id')}")
        if route == "runs/get":
            latest = {m["key"]: m for m in run["history"]}
            return _response(request, 200, {"run": {"info": {}, "data": {"metrics": list(latest.values())}}})
        if route == "metrics/get-history":
            history = [m for m in run["history"] if m["key"] == query.get("metric_key")]
            page, token = _page(history, query.get("page_token"), self.mlflow_page_size)
            return _response(request, 200, {"metrics": page, **({"next_page_token": token} if token else {})})
        return _mlflow_error(request, 404, "ENDPOINT_NOT_FOUND", f"no MLflow route {route}")

    def _registry(self, request: HttpRequest, segments: list[str]) -> Any:
        name = segments[0]
        versions = self.registry_models.get(name)
        if versions is None:
            return _error(request, 404, "NotFound", f"model {name} not in registry azureml")

        def body(version: str) -> dict[str, Any]:
            return {
                "id": f"azureml://registries/azureml/models/{name}/versions/{version}",
                "name": version,
                "type": "Microsoft.MachineLearningServices/registries/models/versions",
                "properties": {
                    "modelType": "mlflow_model",
                    "modelUri": f"azureml://registries/azureml/models/{name}/versions/{version}",
                    "flavors": _FLAVORS,
                    "tags": versions[version],
                    "properties": {},
                    "isArchived": False,
                },
                "systemData": self._system_data(),
            }

        if len(segments) == 2:  # versions, newest first ($orderBy=createdtime desc, $top=1)
            ordered = sorted(versions, key=int, reverse=True)
            return _response(request, 200, {"value": [body(v) for v in ordered[:1]]})
        if segments[2] not in versions:
            return _error(request, 404, "NotFound", f"model {name} has no version {segments[2]}")
        return _response(request, 200, body(segments[2]))

    def _data(self, request: HttpRequest, segments: list[str], body: Any) -> Any:
        method = request.method
        if not segments:  # containers
            names = sorted({n for n, _ in self.data})
            value = []
            for name in names:
                versions = {v: d for (n, v), d in self.data.items() if n == name}
                if all(d["properties"].get("isArchived") for d in versions.values()):
                    continue
                value.append(
                    {
                        "id": f"{WORKSPACE_PATH}/data/{name}",
                        "name": name,
                        "properties": {"latestVersion": max(versions, key=int), "dataType": "uri_file"},
                        "systemData": self._system_data(),
                    }
                )
            return _response(request, 200, {"value": value})
        name = segments[0]
        if len(segments) == 2:
            value = [d for (n, _), d in self.data.items() if n == name and not d["properties"].get("isArchived")]
            return _response(request, 200, {"value": value})
        key = (name, segments[2])
        if method == "PUT":
            existing = self.data.get(key)
            stored = {
                "id": f"{WORKSPACE_PATH}/data/{name}/versions/{segments[2]}",
                "name": segments[2],
                "type": "Microsoft.MachineLearningServices/workspaces/data/versions",
                "properties": body["properties"],
                "systemData": existing["systemData"] if existing else self._system_data(),
            }
            self.data[key] = stored
            return _response(request, 200 if existing else 201, stored)
        if key not in self.data:
            return _error(request, 404, "UserError", f"data {name}:{segments[2]} not found")
        return _response(request, 200, self.data[key])

    def _jobs(self, request: HttpRequest, segments: list[str], body: Any) -> Any:
        method = request.method
        if not segments:
            value = sorted(self.jobs.values(), key=lambda j: j["systemData"]["createdAt"], reverse=True)
            return _response(request, 200, {"value": value})
        name = segments[0]
        if method == "PUT":
            if name in self.jobs:
                return _error(request, 400, "UserError", f"job {name} exists and cannot be replaced")
            refusal = self._refuse_job(body["properties"])
            if refusal:
                return _error(request, 400, "UserError", refusal)
            job = dict(body)
            job["properties"] = {**body["properties"], "status": "NotStarted"}
            job.update(
                id=f"{WORKSPACE_PATH}/jobs/{name}",
                name=name,
                type="Microsoft.MachineLearningServices/workspaces/jobs",
                systemData=self._system_data(),
            )
            self.jobs[name] = job
            self.runs[name] = {
                "runId": name,
                "status": "NotStarted",
                "createdTimeUtc": job["systemData"]["createdAt"],
                "lastModifiedUtc": job["systemData"]["createdAt"],
            }
            return _response(request, 201, job)
        if name not in self.jobs:
            return _error(request, 404, "UserError", f"job {name} not found")
        if method == "POST" and segments[1:] == ["cancel"]:
            self.set_job_status(name, "CancelRequested")
            return _response(request, 202, None, {"Location": f"https://management.azure.com{WORKSPACE_PATH}/ops/1"})
        return _response(request, 200, self.jobs[name])

    def _refuse_job(self, properties: dict[str, Any]) -> str | None:
        """What the service refuses in a FineTuning job: undocumented serverless hyperparameters, a serverless job
        on a model whose fine-tuning retired."""
        details = properties["fineTuningDetails"]
        if "computeId" in properties or "resources" in properties:
            return None
        extra = sorted(set(details.get("hyperParameters", {})) - SERVERLESS_HYPERPARAMETERS)
        if extra:
            return f"serverless fine-tuning does not support hyperparameters {extra}"
        match = re.match(r"azureml://registries/azureml/models/([^/]+)/versions/([^/]+)$", details["model"]["uri"])
        tags = self.registry_models.get(match[1], {}).get(match[2], {}) if match else {}
        retired = tags.get("FinetuneRetirementDate")
        if retired and retired <= datetime.now(timezone.utc).date().isoformat():
            return f"serverless fine-tuning of {match[1] if match else '?'} was retired on {retired}"
        return None

    def _blob(self, request: HttpRequest, path: str, body: Any) -> Any:
        if request.method != "PUT":
            return _error(request, 404, "BlobNotFound", "the fake storage account only takes uploads")
        if not request.headers.get("Authorization", "").startswith(f"SharedKey {STORAGE_ACCOUNT}:"):
            return _error(request, 403, "AuthenticationFailed", "no shared key signature")
        self.blobs[path] = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"ETag": '"0x1"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT", "Content-MD5": ""}
        response = _response(request, 201, None, headers)
        return response

    def _datastores(self, request: HttpRequest, segments: list[str], body: Any) -> Any:
        store = {
            "id": f"{WORKSPACE_PATH}/datastores/workspaceblobstore",
            "name": "workspaceblobstore",
            "type": "Microsoft.MachineLearningServices/workspaces/datastores",
            "properties": {
                "datastoreType": "AzureBlob",
                "accountName": STORAGE_ACCOUNT,
                "containerName": "azureml-blobstore-0000",
                "endpoint": "core.windows.net",
                "protocol": "https",
                "isDefault": True,
                "credentials": {"credentialsType": "AccountKey"},
            },
            "systemData": self._system_data(),
        }
        if not segments:
            return _response(request, 200, {"value": [store]})
        if segments[1:] == ["listSecrets"]:
            return _response(request, 200, {"secretsType": "AccountKey", "key": STORAGE_KEY})
        return _response(request, 200, store)

    def _computes(self, request: HttpRequest, segments: list[str], body: Any) -> Any:
        size = self.computes.get(segments[0])
        if size is None:
            return _error(request, 404, "NotFound", f"compute {segments[0]} not found")
        return _response(
            request,
            200,
            {
                "id": f"{WORKSPACE_PATH}/computes/{segments[0]}",
                "name": segments[0],
                "type": "Microsoft.MachineLearningServices/workspaces/computes",
                "location": self.location,
                "properties": {
                    "computeType": "AmlCompute",
                    "provisioningState": "Succeeded",
                    "properties": {
                        "vmSize": size.upper(),
                        "vmPriority": "Dedicated",
                        "scaleSettings": {"maxNodeCount": 1, "minNodeCount": 0},
                    },
                },
            },
        )

    def _online(self, request: HttpRequest, segments: list[str], body: Any) -> Any:
        method = request.method
        if not segments:
            return _response(request, 200, {"value": list(self.online_endpoints.values())})
        name = segments[0]
        if len(segments) >= 3 and segments[1] == "deployments":
            return self._online_deployment(request, name, segments[2], body)
        if method == "PUT":
            existing = self.online_endpoints.get(name)
            endpoint = {
                "id": f"{WORKSPACE_PATH}/onlineEndpoints/{name}",
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints",
                "location": body["location"],
                "kind": "Managed",
                "identity": {"type": "SystemAssigned"},
                "tags": body.get("tags") or {},
                "properties": {
                    **body["properties"],
                    "provisioningState": "Succeeded",
                    "scoringUri": self.scoring_uri,
                },
                "systemData": existing["systemData"] if existing else self._system_data(),
            }
            traffic = endpoint["properties"].get("traffic") or {}
            unknown = [d for d in traffic if (name, d) not in self.online_deployments]
            if unknown:
                return _error(request, 400, "BadArgument", f"traffic names deployments that do not exist: {unknown}")
            self.online_endpoints[name] = endpoint
            return _response(request, 200 if existing else 201, endpoint)
        if name not in self.online_endpoints:
            return _error(request, 404, "NotFound", f"online endpoint {name} not found")
        if method == "POST" and segments[1:] == ["listKeys"]:
            return _response(request, 200, {"primaryKey": ENDPOINT_KEY, "secondaryKey": ENDPOINT_KEY[::-1]})
        if method == "DELETE":
            del self.online_endpoints[name]
            for key in [k for k in self.online_deployments if k[0] == name]:
                del self.online_deployments[key]
            return _response(request, 200, None)
        return _response(request, 200, self.online_endpoints[name])

    def _online_deployment(self, request: HttpRequest, endpoint: str, name: str, body: Any) -> Any:
        if endpoint not in self.online_endpoints:
            return _error(request, 404, "NotFound", f"online endpoint {endpoint} not found")
        if request.method == "PUT":
            model = body["properties"].get("model", "")
            match = re.search(r"/models/([^/]+)/versions/([^/]+)$", model)
            if match is None or (match[1], match[2]) not in self.models:
                return _error(request, 400, "BadArgument", f"model {model} not found in the workspace")
            deployment = {
                "id": f"{WORKSPACE_PATH}/onlineEndpoints/{endpoint}/deployments/{name}",
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments",
                "location": body["location"],
                "sku": body.get("sku"),
                "properties": {
                    "scaleSettings": {"scaleType": "Default"},
                    **body["properties"],
                    "provisioningState": "Succeeded",
                },
                "systemData": self._system_data(),
            }
            self.online_deployments[(endpoint, name)] = deployment
            return _response(request, 201, deployment)
        if (endpoint, name) not in self.online_deployments:
            return _error(request, 404, "NotFound", f"deployment {name} not found")
        return _response(request, 200, self.online_deployments[(endpoint, name)])

    def _models(self, request: HttpRequest, segments: list[str], body: Any) -> Any:
        if not segments:
            value = [
                {
                    "id": f"{WORKSPACE_PATH}/models/{name}",
                    "name": name,
                    "properties": {"latestVersion": max(v for n, v in self.models if n == name)},
                    "systemData": self._system_data(),
                }
                for name in sorted({n for n, _ in self.models})
            ]
            return _response(request, 200, {"value": value})
        name = segments[0]
        versions = sorted((v for n, v in self.models if n == name), key=int, reverse=True)
        if len(segments) == 2:
            return _response(request, 200, {"value": [self.models[(name, v)] for v in versions[:1]]})
        if (name, segments[2]) not in self.models:
            return _error(request, 404, "UserError", f"model {name}:{segments[2]} not found")
        return _response(request, 200, self.models[(name, segments[2])])

    def _endpoints(self, request: HttpRequest, segments: list[str], body: Any) -> Any:
        method = request.method
        if not segments:
            return _response(request, 200, {"value": [e for e in self.endpoints.values()]})
        name = segments[0]
        if method == "PUT":
            refusal = self._refuse_serverless(name, body["properties"]["modelSettings"]["modelId"])
            if refusal:
                return _error(request, 400, "UserError", refusal)
            endpoint = {
                "id": f"{WORKSPACE_PATH}/serverlessEndpoints/{name}",
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints",
                "location": body["location"],
                "sku": body["sku"],
                "properties": {
                    **body["properties"],
                    "authMode": "Key",
                    "provisioningState": "Creating",
                    "inferenceEndpoint": {"uri": self.scoring_uri, "headers": {}},
                },
                "systemData": self._system_data(),
                "_polls": self.endpoint_polls,
            }
            self.endpoints[name] = endpoint
            return _response(request, 201, _public(endpoint))
        if name not in self.endpoints:
            return _error(request, 404, "NotFound", f"serverless endpoint {name} not found")
        endpoint = self.endpoints[name]
        if method == "POST" and segments[1:] == ["listKeys"]:
            return _response(request, 200, {"primaryKey": ENDPOINT_KEY, "secondaryKey": ENDPOINT_KEY[::-1]})
        if method == "DELETE":
            endpoint["properties"]["provisioningState"] = "Deleting"
            return _response(request, 202, None)
        state = endpoint["properties"]["provisioningState"]
        if state == "Deleting":
            del self.endpoints[name]
        elif state == "Creating":
            endpoint["_polls"] -= 1
            if endpoint["_polls"] < 0:
                endpoint["properties"]["provisioningState"] = "Succeeded"
        return _response(request, 200, _public(endpoint))

    def _refuse_serverless(self, name: str, model_id: str) -> str | None:
        """What the service refuses in a serverless deployment of a fine-tuned model: one fine-tuned on managed
        compute, and a second deployment of the same model."""
        for other, endpoint in self.endpoints.items():
            if other != name and endpoint["properties"]["modelSettings"]["modelId"] == model_id:
                return f"model {model_id} already has a serverless deployment ({other})"
        match = re.match(
            rf"azureml://locations/[^/]+/workspaces/{self.workspace_guid}/models/([^/]+)/versions/([^/]+)$", model_id
        )
        if match is None:
            return None  # a model of another workspace of the tenant: Azure resolves it there
        model = self.models.get((match[1], match[2]))
        if model is None:
            return f"model {match[1]}:{match[2]} not found"
        job = self.jobs.get(model["properties"]["jobName"], {}).get("properties", {})
        if "computeId" in job or "resources" in job:
            return "a model fine-tuned on managed compute cannot be deployed to a serverless endpoint"
        return None

    def _now(self) -> str:
        self._ticks += 1
        return (_EPOCH + timedelta(seconds=self._ticks)).isoformat().replace("+00:00", "Z")

    def _system_data(self) -> dict[str, str]:
        now = self._now()
        return {
            "createdAt": now,
            "createdBy": "tester@example.com",
            "createdByType": "User",
            "lastModifiedAt": now,
            "lastModifiedBy": "tester@example.com",
            "lastModifiedByType": "User",
        }


def _public(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------- chat endpoint
@dataclass
class ChatServer:
    """A loopback HTTP server speaking the OpenAI chat completions shape, as a serverless endpoint does."""

    key: str = ENDPOINT_KEY
    requests: list[dict[str, Any]] = field(default_factory=list)
    throttle: int = 0

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {key.lower(): value for key, value in self.headers.items()}
                server.requests.append({"path": self.path, "headers": headers, "body": payload})
                if self.headers.get("Authorization") != f"Bearer {server.key}":
                    # Real services echo nothing secret; this one does, to prove phitune redacts what it shows.
                    self._send(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
                elif self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                elif server.throttle > 0:
                    server.throttle -= 1
                    self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.01"})
                else:
                    question = payload["messages"][-1]["content"]
                    self._send(
                        200,
                        {
                            "id": "chatcmpl-fake-1",
                            "object": "chat.completion",
                            "created": 1735689600,
                            "model": "phi-3-mini-4k-instruct-ft",
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": f"echo: {question}"},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
                        },
                    )

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
