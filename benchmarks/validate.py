"""Dataset validation throughput: ``phitune.datasets.validate`` against Together's ``check_file``.

Generates a chat JSONL file (about 200 MB; 20 MB with ``--quick``) and validates it three ways, each run in a
fresh subprocess so that each one's peak RSS is its own: ours in one process (``phitune``), ours with
``workers=--workers`` (``phitune-parallel``, default 2; files of 32 MiB or less are checked in one process anyway)
and Together's. The runs alternate and the median of ``--repeat`` runs is reported: seconds, CPU seconds (the
process's and its workers'), MB/s, lines/s, peak RSS (and its growth during the call), the largest worker's peak
RSS (forked workers share the parent's pages, so adding it to the parent's overstates the total) and the ratios
ours/theirs, one process and parallel.

The generated data: 30% of conversations open with a system prompt (median 200 characters); 1 to 8 user/assistant
turns (half of them single-turn); user messages log-normal around 300 characters, assistant replies around 700
(both with a long tail, capped at 20k/30k); one conversation in ten mixes in accented and CJK words; half of the
lines are written with ``ensure_ascii=True`` (``\\uXXXX`` escapes, Python's default), half as raw UTF-8.

The two tools do not check the same things. Together's ``check_file`` (together 3.1) checks that the file is UTF-8,
that each non-blank line is a JSON object and that there are enough samples; it stops at the first problem and
leaves the content rules to its server. Ours checks every line against the format's rules (roles, turn order,
content types, empty content, mixed formats, ...), collects every problem with its line number and counts tokens
(the approximate counter, as ``validate`` does by default; the exact one is far slower, bounded by the tokenizer).

Measured on a 2-vCPU AMD EPYC VM whose cores other jobs were using (load average near 3), ``--repeat 5``:

=======  =================  =================  =================  ==================================
file     ours, one process  ours, 2 processes  Together           peak RSS, ours / theirs
=======  =================  =================  =================  ==================================
200 MB   0.41 s, 493 MB/s   0.44 s, 451 MB/s   0.85 s, 234 MB/s   38 / 50 MB (and 28 MB a worker)
20 MB    0.042 s, 482 MB/s  (one process)      0.088 s, 227 MB/s  37 / 49 MB
=======  =================  =================  =================  ==================================

That is 2.1x Together's throughput in one process. Two processes did not help there: their CPU seconds (0.44)
equalled their wall time, so the two workers shared one free core, and starting them costs about 30 ms of CPU.
With two idle cores each worker would check half of the file; that was not measured here.

In one process the time goes to msgspec building the typed messages (~45%), the per-message checks and token
estimate in Python (~30%) and reading and splitting lines (~20%). Decoding ``content`` as ``msgspec.Raw`` instead
is slower on this data: 85% of messages hold an escape (``\\n``, ``\\uXXXX``), so their byte length still needs
the string decoded.

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


def _child(tool: str, path: str, workers: int) -> None:
    """Run one validation in this process and print its measurements as JSON."""
    if tool.startswith("phitune"):
        from phitune.datasets import validate

        processes = workers if tool == "phitune-parallel" else 1

        def call() -> dict[str, Any]:
            report = validate(path, workers=processes)
            return {"ok": report.ok, "examples": report.examples, "errors": report.error_count}
    else:
        from together.lib.utils import check_file

        def call() -> dict[str, Any]:
            report = check_file(path)
            return {"ok": report["is_check_passed"], "examples": report.get("num_samples"), "errors": None}

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest worker's, if any ran
    print(
        json.dumps(
            {
                **result,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_rss_mb": peak / 1024,
                "rss_growth_mb": (peak - before) / 1024,
                "worker_peak_rss_mb": worker_peak / 1024,
            }
        )
    )


def _cpu_seconds() -> float:
    """User and system CPU time of this process and of its finished children (the workers of a parallel run)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(tool: str, path: Path, workers: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", tool, str(path), "--workers", str(workers)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 20 MB file instead of 200 MB")
    parser.add_argument("--path", type=Path, help="the JSONL file to validate (generated there when missing)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool (median reported)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel run (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, path = args.child
        _child(tool, path, args.workers)
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
        runs: dict[str, list[dict[str, Any]]] = {"phitune": [], "phitune-parallel": [], "together": []}
        for _ in range(args.repeat):
            for tool in runs:
                runs[tool].append(_measure(tool, path, args.workers))

    summary: dict[str, Any] = {
        "file_mb": size / 1e6,
        "lines": lines,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "workers": args.workers,
    }
    for tool, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        summary[tool] = {
            "seconds": round(seconds, 3),
            "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in results), 3),
            "mb_per_s": round(size / 1e6 / seconds, 1),
            "lines_per_s": round(lines / seconds),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in results), 1),
            "rss_growth_mb": round(max(r["rss_growth_mb"] for r in results), 1),
            "worker_peak_rss_mb": round(max(r["worker_peak_rss_mb"] for r in results), 1),
            "ok": results[-1]["ok"],
            "examples": results[-1]["examples"],
        }
    serial, parallel, theirs = summary["phitune"], summary["phitune-parallel"], summary["together"]
    summary["throughput_ratio"] = round(theirs["seconds"] / serial["seconds"], 2)
    summary["throughput_ratio_parallel"] = round(theirs["seconds"] / parallel["seconds"], 2)
    summary["peak_rss_ratio"] = round(serial["peak_rss_mb"] / theirs["peak_rss_mb"], 2)

    print(f"file: {summary['file_mb']:.1f} MB, {lines} lines; median of {args.repeat} runs each")
    print(f"{'tool':17} {'seconds':>8} {'CPU s':>7} {'MB/s':>8} {'lines/s':>10} {'peak RSS MB':>12} {'worker MB':>10}")
    for tool in runs:
        r = summary[tool]
        print(
            f"{tool:17} {r['seconds']:8.3f} {r['cpu_seconds']:7.3f} {r['mb_per_s']:8.1f} {r['lines_per_s']:10d} "
            f"{r['peak_rss_mb']:12.1f} {r['worker_peak_rss_mb']:10.1f}"
        )
    print(
        f"throughput ours/theirs: {summary['throughput_ratio']}x in one process, "
        f"{summary['throughput_ratio_parallel']}x in {args.workers}; "
        f"peak RSS ours/theirs: {summary['peak_rss_ratio']}x"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
