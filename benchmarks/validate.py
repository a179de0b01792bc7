"""Dataset validation throughput: ``phitune.datasets.validate`` against Together's ``check_file``.

Generates a chat JSONL file (about 200 MB; 20 MB with ``--quick``) and validates it with both tools, each in a
fresh subprocess so that each one's peak RSS is its own; the runs alternate and the median of ``--repeat`` runs
is reported: seconds, MB/s, lines/s, peak RSS (and its growth during the call) and the ratio ours/theirs.

The generated data: 30% of conversations open with a system prompt (median 200 characters); 1 to 8 user/assistant
turns (half of them single-turn); user messages log-normal around 300 characters, assistant replies around 700
(both with a long tail, capped at 20k/30k); one conversation in ten mixes in accented and CJK words; half of the
lines are written with ``ensure_ascii=True`` (``\\uXXXX`` escapes, Python's default), half as raw UTF-8.

The two tools do not check the same things. Together's ``check_file`` (together 3.1) checks that the file is UTF-8,
that each non-blank line is a JSON object and that there are enough samples; it stops at the first problem and
leaves the content rules to its server. Ours checks every line against the format's rules (roles, turn order,
content types, empty content, mixed formats, ...), collects every problem with its line number and counts tokens
(the approximate counter, as ``validate`` does by default; the exact one is far slower, bounded by the tokenizer).

Install: ``pip install -e '.[bench]'``.  Run: ``python benchmarks/validate.py [--quick] [--path FILE] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "model train data loss token learning rate batch epoch function value return print list string error example"
)
_FOREIGN = "café naïve über straße façade résumé señor 你好 世界 数据 模型 训练 こんにちは データ 학습 모델"


def _corpus(rng: random.Random, words: list[str], size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(words)
        out.append(word)
        length += len(word) + 1
        if rng.random() < 0.04:
            out.append("\n")
    return " ".join(out)


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write a chat JSONL file of about ``megabytes`` MB; returns its number of lines."""
    rng = random.Random(seed)
    words = _WORDS.split()
    english = _corpus(rng, words, 1 << 20)
    mixed = _corpus(rng, words * 3 + _FOREIGN.split(), 1 << 20)

    def text(median: float, sigma: float, cap: int, corpus: str) -> str:
        n = max(2, min(cap, int(rng.lognormvariate(0, sigma) * median)))
        start = rng.randrange(0, len(corpus) - n)
        return corpus[start : start + n].strip() or "ok"

    target = int(megabytes * 1e6)
    written = lines = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            corpus = mixed if rng.random() < 0.1 else english
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": text(200, 0.6, 4000, corpus)})
            for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3, 3, 4, 8))):
                messages.append({"role": "user", "content": text(300, 1.0, 20000, corpus)})
                messages.append({"role": "assistant", "content": text(700, 0.9, 30000, corpus)})
            line = json.dumps({"messages": messages}, ensure_ascii=rng.random() < 0.5) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
            lines += 1
    return lines


def _child(tool: str, path: str) -> None:
    """Run one validation in this process and print its measurements as JSON."""
    if tool == "phitune":
        from phitune.datasets import validate

        def call() -> dict[str, Any]:
            report = validate(path)
            return {"ok": report.ok, "examples": report.examples, "errors": report.error_count}
    else:
        from together.lib.utils import check_file

        def call() -> dict[str, Any]:
            report = check_file(path)
            return {"ok": report["is_check_passed"], "examples": report.get("num_samples"), "errors": None}

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps({**result, "seconds": seconds, "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - before) / 1024})
    )


def _measure(tool: str, path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", tool, str(path)], check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 20 MB file instead of 200 MB")
    parser.add_argument("--path", type=Path, help="the JSONL file to validate (generated there when missing)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    megabytes = 20 if args.quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp) / f"chat-{megabytes}mb.jsonl"
        if not path.exists():
            started = time.perf_counter()
            generate(path, megabytes)
            print(f"generated {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        runs: dict[str, list[dict[str, Any]]] = {"phitune": [], "together": []}
        for _ in range(args.repeat):
            for tool in runs:
                runs[tool].append(_measure(tool, path))

    summary: dict[str, Any] = {
        "file_mb": size / 1e6,
        "lines": lines,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
    }
    for tool, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        summary[tool] = {
            "seconds": round(seconds, 3),
            "mb_per_s": round(size / 1e6 / seconds, 1),
            "lines_per_s": round(lines / seconds),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results), 1),
            "rss_growth_mb": round(max(r["rss_growth_mb"] for r in results), 1),
            "ok": results[-1]["ok"],
            "examples": results[-1]["examples"],
        }
    ours, theirs = summary["phitune"], summary["together"]
    summary["throughput_ratio"] = round(theirs["seconds"] / ours["seconds"], 2)
    summary["peak_rss_ratio"] = round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 2)

    print(f"file: {summary['file_mb']:.1f} MB, {lines} lines; median of {args.repeat} runs each")
    print(f"{'tool':10} {'seconds':>8} {'MB/s':>8} {'lines/s':>10} {'peak RSS MB':>12} {'RSS growth MB':>14}")
    for tool in runs:
        r = summary[tool]
        print(
            f"{tool:10} {r['seconds']:8.3f} {r['mb_per_s']:8.1f} {r['lines_per_s']:10d} "
            f"{r['peak_rss_mb']:12.1f} {r['rss_growth_mb']:14.1f}"
        )
    print(f"throughput ours/theirs: {summary['throughput_ratio']}x; peak RSS ours/theirs: {summary['peak_rss_ratio']}x")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
