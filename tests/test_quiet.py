"""What the libraries under phitune print stays out of its commands' output, and bitsandbytes never reaches for the
Hugging Face Hub (see :mod:`phitune._third_party`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from phitune._third_party import DEEPSPEED_ACCELERATOR_BANNER, HUB_KERNEL_WARNING

SOURCES = Path(__file__).resolve().parents[1] / "src"
NOISE = (
    DEEPSPEED_ACCELERATOR_BANNER,  # DeepSpeed, imported by accelerate in save_pretrained
    HUB_KERNEL_WARNING,  # bitsandbytes, imported by peft
    "kernels-community",
    "FutureWarning",  # peft calling what transformers deprecates
    "Warning:",
    "Loading weights",  # transformers' progress bars
    "Writing model shards",
    "it/s]",
)


def _python(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{SOURCES}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update({"PHITUNE_WORKER_IDLE_TIMEOUT": "4", "HF_HUB_OFFLINE": "1"})
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, check=False, timeout=1800)


def _phitune(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return _python("-m", "phitune", "--home", str(home), *argv)


@pytest.mark.slow
def test_demo_chat_and_export_print_no_third_party_noise(tmp_path: Path) -> None:
    """Their output holds none of what the libraries print (and the demo's table and counts say what they show)."""
    home = tmp_path / "home"
    demo = _phitune(home, "demo", "--steps", "2")  # too few steps to learn, enough to run every stage
    assert "8 of the 20 training questions, asked as in training (greedy)" in demo.stdout, demo.stderr
    assert "exact match on the 20 training questions: base model 0/20 -> fine-tuned" in demo.stdout
    done = [demo]
    (job,) = json.loads(_phitune(home, "--json", "jobs", "list").stdout)
    model = job["fine_tuned_model"]
    done.append(_phitune(home, "export", model, "--format", "merged", "--dest", str(tmp_path / "merged")))
    done.append(_phitune(home, "deploy", model, "--name", "quiet"))
    chat = ["chat", "quiet", "What is the capital of France?", "--max-tokens", "4"]
    done.append(_phitune(home, *chat))
    for run in done:
        assert run.returncode in (0, 1) and run.stderr == "", run.args  # demo: 1 when 2 steps taught it nothing
        for noise in NOISE:
            assert noise not in run.stdout, (run.args, noise, run.stdout)
    job_events = _phitune(home, "jobs", "events", job["id"]).stdout
    assert "job succeeded" in job_events and not any(noise in job_events for noise in NOISE)

    verbose = _phitune(home, "--verbose", *chat)
    assert "FutureWarning" in verbose.stderr  # shown where asked for


def test_bitsandbytes_never_asks_the_hub_for_its_cpu_kernel() -> None:
    """On a CPU with AVX512-BF16 (simulated here: bitsandbytes asks its native library), bitsandbytes' import calls
    kernels.get_kernel for a kernel on the Hub; after ``import phitune`` it does not, and says nothing about it."""
    script = textwrap.dedent(
        """
        import importlib.abc, importlib.util, sys

        import kernels

        hub_requests = []

        def get_kernel(repo_id, version=None):
            hub_requests.append(repo_id)
            raise OSError("no network")

        kernels.get_kernel = get_kernel

        class AVX512BF16(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path, target=None):
                if fullname != "bitsandbytes.cextension":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(fullname)
                run = spec.loader.exec_module

                def exec_module(module):
                    run(module)
                    module.lib.has_avx512bf16_cpu = lambda: True

                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, AVX512BF16())
        import phitune

        assert importlib.util.find_spec("bitsandbytes") is not None  # a probe, as availability checks make first
        import peft  # imports bitsandbytes
        import bitsandbytes

        assert bitsandbytes.functional.has_avx512bf16()
        assert "kernels" in sys.modules and sys.modules["kernels"] is kernels  # left as it was found
        print("hub requests:", hub_requests)
        """
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hub requests: []\n" and HUB_KERNEL_WARNING not in done.stderr


def test_a_script_quiets_the_libraries_with_one_call(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        import phitune

        if sys.argv[1] == "quiet":
            phitune.quiet_libraries()
        from phitune.tiny import ensure_tiny_phi3  # saves a model: accelerate imports DeepSpeed

        folder = ensure_tiny_phi3(Path(sys.argv[2]))
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(folder)  # "Loading weights" progress bar
        """
    )
    loud = _python("-c", script, "loud", str(tmp_path / "loud"))
    assert DEEPSPEED_ACCELERATOR_BANNER in loud.stdout + loud.stderr and "Loading weights" in loud.stderr
    quiet = _python("-c", script, "quiet", str(tmp_path / "quiet"))
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""
