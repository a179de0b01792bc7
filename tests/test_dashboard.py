"""The dashboard of ``phitune serve``: the page and its routes over HTTP, then a whole job driven in headless Chromium
(Playwright, Debian's ``chromium``): upload, create, watch the curves grow, pause, resume, cancel, deploy, chat and
export. Screenshots of the job pages land in ``artifacts/`` (ignored by git)."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from conftest import write_chat
from phitune.server.app import create_app
from test_server import running

KEY = "sk-phitune-dashboard-0123456789"
CHROMIUM = Path(os.environ.get("PHITUNE_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TRAINING = 1_800_000  # ms: the bound of every wait on training


@pytest.fixture(scope="module")
def app(server_home: Path) -> FastAPI:
    return create_app(server_home, api_key=KEY)


@pytest.fixture(scope="module")
def base_url(app: FastAPI) -> Iterator[str]:
    with running(app) as url:
        yield url.removesuffix("/v1")


@pytest.fixture
def bad_dataset(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        "not json\n"
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    return path


# ------------------------------------------------------------------------------------------------------ over HTTP
def test_the_page_loads_without_the_key_and_the_api_still_needs_it(base_url: str) -> None:
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    assert 'src="dashboard/dashboard.js"' in page.text
    script = httpx.get(f"{base_url}/dashboard/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "sessionStorage" in script.text and "Authorization" in script.text
    assert httpx.get(f"{base_url}/dashboard/dashboard.css").status_code == 200
    assert httpx.get(f"{base_url}/dashboard/../app.py").status_code == 404

    for method, route in [("GET", "/v1/models"), ("POST", "/v1/phitune/files/validate"),
                          ("POST", "/v1/phitune/models/tiny-phi3/export")]:  # fmt: skip
        response = httpx.request(method, f"{base_url}{route}")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", route


def test_validation_reports_every_problem_by_line_and_stores_nothing(
    base_url: str, server_home: Path, bad_dataset: Path, tmp_path: Path
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    files = {"file": ("bad.jsonl", bad_dataset.read_bytes())}
    validate = f"{base_url}/v1/phitune/files/validate"
    response = httpx.post(validate, headers=auth, files=files, data={"model": "tiny-phi3"})
    assert response.status_code == 200
    report = response.json()
    assert report["path"] == "bad.jsonl" and report["ok"] is False and report["error_count"] == 2
    assert [(e["line"], e["category"]) for e in report["errors"]] == [(2, "invalid_json"), (3, "no_assistant")]
    assert report["tokens"]["exact"] and report["tokens"]["tokenizer"]
    assert str(server_home) not in response.text and str(tmp_path) not in response.text
    assert httpx.get(f"{base_url}/v1/files", headers=auth).json()["data"] == []
    assert not any((server_home / "tmp").iterdir())

    good = write_chat(tmp_path / "train.jsonl")
    files = {"file": ("train.jsonl", good.read_bytes())}
    report = httpx.post(validate, headers=auth, files=files).json()
    assert report["ok"] and report["examples"] == 8 and not report["tokens"]["exact"]  # no model: approximate
    refused = httpx.post(validate, headers=auth, files=files, data={"model": "/etc"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"


def test_export_is_for_fine_tuned_models_of_this_home(base_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for model in ("tiny-phi3", "ft:nothing:here", "%2Fetc"):
        response = httpx.post(f"{base_url}/v1/phitune/models/{model}/export", headers=auth, json={})
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", model
    bad = httpx.post(f"{base_url}/v1/phitune/models/x/export", headers=auth, json={"format": "gguf"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"


# --------------------------------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install 'phitune[dev]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PHITUNE_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


def _points(page: Any, chart: str) -> int:
    line = page.locator(f"#chart-{chart} polyline.series-0")
    return len((line.get_attribute("points") or "").split()) if line.count() else 0


def _reads_well(page: Any) -> None:
    """No value shows as a JavaScript placeholder."""
    text = page.locator("main").inner_text()
    assert not re.search(r"\b(null|undefined|NaN)\b", text), text


@pytest.mark.browser
def test_a_whole_job_in_the_dashboard(
    browser: Any, base_url: str, server_home: Path, bad_dataset: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base_url}/")

    # the key, asked once and kept in this tab's session
    expect(page.get_by_role("heading", name="API key")).to_be_visible()
    page.get_by_label("API key").fill("wrong")
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_role("alert")).to_have_text("That API key was refused.")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    assert page.evaluate("() => sessionStorage.getItem('phitune.apiKey')") == KEY and KEY not in page.url

    # files: a bad dataset's report, line by line, then a good one stored
    page.get_by_role("link", name="Files").click()
    page.get_by_label("Dataset (JSONL)").set_input_files(bad_dataset)
    page.get_by_label("Count tokens with").select_option("tiny-phi3")
    page.get_by_role("button", name="Check and upload").click()
    problems = page.get_by_role("table", name="Problems")
    expect(problems.locator("tbody tr")).to_have_count(2)
    expect(problems.locator("tbody tr").first).to_contain_text("2invalid_json")
    expect(page.get_by_text("Invalid: 2 problem(s). Nothing was uploaded.")).to_be_visible()
    _reads_well(page)
    page.screenshot(path=ARTIFACTS / "dashboard-files.png", full_page=True)
    page.get_by_label("Dataset (JSONL)").set_input_files(write_chat(tmp_path / "train.jsonl"))
    page.get_by_role("button", name="Check and upload").click()
    expect(page.locator("#notice")).to_contain_text("Uploaded train.jsonl as file-")
    expect(page.get_by_role("table", name="Stored datasets")).to_contain_text("train.jsonl")

    # a short job with validation, watched to the end
    page.get_by_role("link", name="Jobs").click()
    page.get_by_text("New job").click()
    page.get_by_label("Validation file").select_option(index=1)
    for label, value in [("Epochs", "50"), ("Max steps", "6"), ("Learning rate", "0.003"),
                         ("Max sequence length", "128"), ("Checkpoint every (steps)", "3"),
                         ("Validation every (steps)", "2"), ("Suffix", "dash")]:  # fmt: skip
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    done = page.locator(".job-status .status")
    expect(done).to_have_text("succeeded", timeout=TRAINING)
    expect(page.locator("#chart-loss-latest")).to_contain_text("Latest, step 6: training loss")
    assert _points(page, "loss") == 6 and page.locator("#chart-loss circle.series-1").count() == 3  # steps 2, 4, 6
    assert _points(page, "learning-rate") == 6 and _points(page, "tokens-per-second") == 6
    expect(page.get_by_role("table", name="Checkpoints, newest first")).to_contain_text(":ckpt-step-3")
    expect(page.get_by_role("table", name="Events, newest first")).to_contain_text("job succeeded")
    _reads_well(page)
    page.screenshot(path=ARTIFACTS / "dashboard-job.png", full_page=True)
    assert str(server_home) not in page.content()

    # deploy the result, export it, chat with it (streamed)
    model = page.locator("#result-title + p .mono").inner_text()
    page.get_by_label("Deployment name").fill("dash-phi")
    page.get_by_role("button", name="Deploy").click()
    expect(page.get_by_text("Deployed as dash-phi.")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="Export and download").click()
    archive = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert download.value.suggested_filename.endswith("-adapter.zip")
    assert {"adapter_config.json", "adapter_model.safetensors", "export_report.json"} <= set(archive.namelist())
    adapter_config = json.loads(archive.read("adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == "tiny-phi3"  # named, not the server's folder
    page.get_by_role("link", name="Chat with it").click()
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".message.assistant[data-done]")
    expect(answer).to_have_count(1, timeout=TRAINING)
    reply = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY).chat.completions.create(
        model="dash-phi", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert answer.locator("p").inner_text() == reply.choices[0].message.content
    _reads_well(page)
    assert model == reply.model

    # a long job: the curve grows, pauses, resumes from its checkpoint and is cancelled
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY)
    long_job = oai.fine_tuning.jobs.create(
        model="tiny-phi3",
        training_file=oai.files.list().data[0].id,
        extra_body={"phitune": {"hyperparameters": {"epochs": 1000, "max_steps": 2000, "max_seq_length": 128}}},
    )
    page.goto(f"{base_url}/#/jobs/{long_job.id}")
    expect(page.locator("#chart-loss polyline.series-0")).to_have_attribute(
        "points", re.compile(r"^(\S+ ){2,}\S+$"), timeout=TRAINING
    )
    seen = _points(page, "loss")
    page.get_by_role("button", name="Pause").click()
    expect(page.locator(".job-status .status")).to_have_text("paused")
    stopped = page.get_by_role("table", name="Events, newest first").get_by_text(re.compile(r"job paused at step \d+"))
    expect(stopped).to_be_visible(timeout=TRAINING)
    paused_at = int(re.findall(r"paused at step (\d+)", stopped.inner_text())[0])
    assert paused_at >= seen >= 3 and _points(page, "loss") == paused_at
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#chart-loss-latest")).not_to_contain_text(f"step {paused_at}:", timeout=TRAINING)
    assert _points(page, "loss") > paused_at
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".job-status .status")).to_have_text("cancelled", timeout=TRAINING)
    for button in ("Pause", "Resume", "Cancel"):
        expect(page.get_by_role("button", name=button)).to_be_disabled()
    page.screenshot(path=ARTIFACTS / "dashboard-cancelled.png", full_page=True)
    assert errors == []
    events = httpx.get(f"{base_url}/v1/fine_tuning/jobs/{long_job.id}/events?limit=1000", headers={"api-key": KEY})
    assert "checkpoint saved at step" in events.text and str(server_home) not in events.text
