"""An Azure job's training metrics, read from the workspace's MLflow tracking server.

Azure ML workspaces are MLflow tracking servers: the fine-tuning pipeline's trainer logs its metrics (Hugging Face
Trainer names: ``loss``, ``eval_loss``, ``learning_rate``, ``grad_norm``, ``epoch``) to the job's run or to its child
runs (the pipeline's steps). This module speaks MLflow's REST API 2.0 at the address the azureml-mlflow plugin uses
(``https://<region>.api.azureml.ms/mlflow/v2.0/<workspace scope>/api/2.0/mlflow/...``) with an AAD token for Azure
Resource Manager, through an azure-core pipeline, so the transport given to the backend carries these calls too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_TRACKING_URI = re.compile(r"^azureml://(?P<host>[^/]+)/mlflow/v\d+\.\d+(?P<scope>/subscriptions/.+)$")

# Hugging Face Trainer's metric names as phitune's metrics events name them; other keys keep their names.
# ``train_loss`` is the Trainer's mean over the whole run, logged once at the end.
METRIC_NAMES = {"loss": "train_loss", "eval_loss": "valid_loss", "train_loss": "mean_train_loss"}


@dataclass(frozen=True)
class MetricPoint:
    """One logged value: the run that logged it, phitune's name for it, its step and when (ms since the epoch)."""

    run_id: str
    key: str
    value: float
    step: int
    timestamp_ms: int


class WorkspaceMetrics:
    """Reads the metrics of a job's run and its child runs. ``call(send, route)`` runs each request under the
    backend's retry policy and error translation (a 404 becomes :class:`~phitune.errors.NotFoundError`)."""

    def __init__(
        self, tracking_uri: str, *, credential: Any, scopes: list[str], transport: Any, call: Callable[..., Any]
    ) -> None:
        from azure.core import PipelineClient
        from azure.core.pipeline.policies import BearerTokenCredentialPolicy, HeadersPolicy

        match = _TRACKING_URI.match(tracking_uri)
        if match is None:
            raise ValueError(f"not an Azure ML MLflow tracking URI: {tracking_uri}")
        base = f"https://{match['host']}/mlflow/v2.0{match['scope']}/api/2.0/mlflow"
        policies = [HeadersPolicy(), BearerTokenCredentialPolicy(credential, *scopes)]
        options: dict[str, Any] = {"transport": transport} if transport is not None else {}
        self._client: Any = PipelineClient(base_url=base, policies=policies, **options)
        self._base = base
        self._call = call
        self._experiments: dict[str, str] = {}

    def points(self, job_name: str, experiment: str) -> list[MetricPoint]:
        """Every metric value logged by the job's run and its child runs, in step order."""
        experiment_id = self._experiment_id(experiment)
        runs = [job_name, *(run_id for run_id in self._children(experiment_id, job_name))]
        points: list[MetricPoint] = []
        for run_id in runs:
            for key in self._metric_keys(run_id):
                points.extend(self._history(run_id, key))
        points.sort(key=lambda p: (p.step, p.timestamp_ms))
        return points

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            body = self._get("experiments/get-by-name", {"experiment_name": name})
            self._experiments[name] = str(body["experiment"]["experiment_id"])
        return self._experiments[name]

    def _children(self, experiment_id: str, parent: str) -> Iterator[str]:
        token: str | None = None
        while True:
            query: dict[str, Any] = {
                "experiment_ids": [experiment_id],
                "filter": f"tags.mlflow.parentRunId = '{parent}'",
                "max_results": 100,
            }
            if token:
                query["page_token"] = token
            body = self._post("runs/search", query)
            for run in body.get("runs", []):
                yield str(run["info"]["run_id"])
            token = body.get("next_page_token")
            if not token:
                return

    def _metric_keys(self, run_id: str) -> list[str]:
        body = self._get("runs/get", {"run_id": run_id})
        return sorted({str(m["key"]) for m in body["run"].get("data", {}).get("metrics", [])})

    def _history(self, run_id: str, key: str) -> Iterator[MetricPoint]:
        token: str | None = None
        while True:
            query = {"run_id": run_id, "metric_key": key, "max_results": "1000"}
            if token:
                query["page_token"] = token
            body = self._get("metrics/get-history", query)
            for metric in body.get("metrics", []):
                yield MetricPoint(
                    run_id=run_id,
                    key=METRIC_NAMES.get(key, key),
                    value=float(metric["value"]),
                    step=int(metric.get("step", 0)),
                    timestamp_ms=int(metric.get("timestamp", 0)),
                )
            token = body.get("next_page_token")
            if not token:
                return

    def _get(self, route: str, params: dict[str, str]) -> dict[str, Any]:
        return self._send("GET", route, params=params)

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", route, json=body)

    def _send(self, method: str, route: str, **content: Any) -> dict[str, Any]:
        from azure.core.rest import HttpRequest

        def send() -> dict[str, Any]:
            response = self._client.send_request(HttpRequest(method, f"{self._base}/{route}", **content))
            response.raise_for_status()
            body = response.json()
            return body if isinstance(body, dict) else {}

        result: dict[str, Any] = self._call(send, route)
        return result
