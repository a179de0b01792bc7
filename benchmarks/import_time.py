"""Start-up cost: ``import phitune`` and ``phitune --help`` against ``import openai``, in fresh processes.

Each measurement is a new interpreter (``python -c ...``), so nothing is cached in-process; the commands alternate in
every repetition to share the machine's drift, and the figures are medians. ``python -c pass`` is measured the same
way, so ``*_over_python_ms`` is what the import itself costs. ``import phitune`` must not load torch, transformers,
peft, trl, the Azure SDK or openai: ``heavy_modules`` lists any that a bare import pulls in (it should be empty).

    python benchmarks/import_time.py [--repeat 15] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "azure", "openai", "numpy", "deepspeed")
"""Top-level packages ``import phitune`` must leave alone."""


def commands() -> dict[str, list[str]]:
    if importlib.util.find_spec("openai") is None:
        sys.exit("openai is not installed here: pip install openai")
    python = sys.executable
    script = Path(python).with_name("phitune")
    cli = [str(script)] if script.exists() else [python, "-m", "phitune"]
    return {
        "python": [python, "-c", "pass"],
        "import_phitune": [python, "-c", "import phitune"],
        "phitune_help": [*cli, "--help"],
        "import_openai": [python, "-c", "import openai"],
    }


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def heavy_modules() -> list[str]:
    """Heavy top-level packages in ``sys.modules`` after a bare ``import phitune``."""
    top_level = "{name.split('.')[0] for name in sys.modules}"
    code = f"import sys, json, phitune; print(json.dumps(sorted({top_level} & {set(HEAVY)!r})))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded: list[str] = json.loads(output.strip().splitlines()[-1])
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="runs of each command (medians are reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    runs = commands()
    for command in runs.values():  # warm the page cache and .pyc files once, untimed
        timed(command)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, command in runs.items():
            samples[name].append(timed(command))
    median_ms = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    baseline = median_ms["python"]
    loaded = heavy_modules()
    report: dict[str, Any] = {
        "repeat": args.repeat,
        "python_startup_ms": round(baseline, 1),
        **{f"{name}_ms": round(value, 1) for name, value in median_ms.items() if name != "python"},
        **{
            f"{name}_over_python_ms": round(value - baseline, 1)
            for name, value in median_ms.items()
            if name != "python"
        },
        "import_phitune_vs_openai": round(
            (median_ms["import_phitune"] - baseline) / (median_ms["import_openai"] - baseline), 3
        ),
        "heavy_modules": loaded,
        "import_is_light": not loaded,
        "cli": " ".join(Path(part).name if i == 0 else part for i, part in enumerate(runs["phitune_help"])),
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    if loaded:
        sys.exit(f"import phitune loaded {', '.join(loaded)}")


if __name__ == "__main__":
    main()
