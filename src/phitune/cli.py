"""The ``phitune`` command: a small CLI over the same :class:`phitune.Client`."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import catalog
from ._client import Client, default_home
from .errors import PhituneError
from .estimate import Estimate, GiB


def _client(args: argparse.Namespace) -> Client:
    return Client(home=args.home)


def _print(args: argparse.Namespace, value: BaseModel | Sequence[BaseModel], columns: Sequence[str] = ()) -> None:
    """JSON with --json, else a table for lists and indented JSON for one object."""
    if isinstance(value, BaseModel):
        print(value.model_dump_json(indent=2, exclude_none=True))
        return
    if args.json or not columns:
        print(json.dumps([v.model_dump(mode="json", exclude_none=True) for v in value], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for item in value:
        row = item.model_dump(mode="json")
        table.add_row(*(str(row.get(c, "")) if row.get(c) is not None else "" for c in columns))
    Console().print(table)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ------------------------------------------------------------------------------------------------- commands
def cmd_files(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.files_command == "validate":
        report = client.files.validate(args.path, model=args.model, epochs=args.epochs)
        if args.json:
            print(report.model_dump_json(indent=2))
        else:
            print(
                f"{args.path}: {'ok' if report.ok else 'INVALID'} — {report.examples} examples, format {report.format}"
            )
            tokens = report.tokens
            counted = tokens.tokenizer if tokens.exact else "approximate: no tokenizer on this machine"
            print(
                f"tokens ({counted}): total {tokens.total:,}, "
                f"trainable {tokens.trainable:,}, max {tokens.max:,}, p95 {tokens.p95:,}; "
                f"estimated trained tokens for {report.epochs} epoch(s): {report.estimated_trained_tokens:,}"
            )
            for issue in report.errors:
                print(f"  error   {args.path}:{issue.line}: [{issue.category}] {issue.message}")
            for issue in report.warnings:
                print(f"  warning {args.path}:{issue.line}: [{issue.category}] {issue.message}")
            if report.error_count > len(report.errors):
                print(f"  ... {report.error_count - len(report.errors)} more errors")
        return 0 if report.ok else 1
    if args.files_command == "upload":
        _print(args, client.files.upload(args.path, model=args.model))
    else:
        _print(args, client.files.list(), ("id", "filename", "bytes", "format", "examples"))
    return 0


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``finetune.create`` from the options :func:`_add_job_options` adds."""
    return {
        "model": args.model,
        "training_file": args.training_file,
        "validation_file": args.validation_file,
        "method": args.method,
        "hyperparameters": {key: _parse_value(value) for key, value in (kv.split("=", 1) for kv in args.hp)},
        "suffix": args.suffix,
    }


def _print_estimate(result: Estimate) -> None:
    print(
        f"{result.method} of {result.model} on {result.device} ({result.compute_dtype} compute, "
        f"{result.weight_dtype} weights): {result.trainable_parameters:,} of {result.parameters:,} parameters train"
    )
    parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in result.memory.model_dump().items())
    print(f"memory at the peak (GiB{' per process' if result.processes > 1 else ''}): {parts}")
    if result.kept_matmul_layers or result.kept_down_projections:
        down = f", the down projection's in {result.kept_down_projections} more" if result.kept_down_projections else ""
        print(f"gradient checkpointing keeps the matmul outputs of {result.kept_matmul_layers} layers{down}")
    verdict = "fits" if result.fits else "does NOT fit; what would fit:"
    print(f"peak {result.peak_bytes / GiB:.2f} GiB of {result.available_bytes / GiB:.2f} GiB available: {verdict}")
    if not result.fits:
        nothing = "nothing within reach: a smaller model, or a machine with more memory"
        for suggestion in result.suggestions or [nothing]:
            print(f"  - {suggestion}")
    if result.tokens_per_epoch is not None and result.steps_per_epoch is not None:
        seconds = result.seconds_per_epoch or 0.0
        duration = f"{seconds:.1f} s" if seconds < 60 else str(datetime.timedelta(seconds=round(seconds)))
        print(
            f"per epoch: {result.examples or 0:,} examples, {result.tokens_per_epoch:,} tokens "
            f"({result.trainable_tokens_per_epoch or 0:,} trainable), {result.steps_per_epoch:,} "
            f"step{'' if result.steps_per_epoch == 1 else 's'}, ~{duration}"
        )
    print(f"speed: ~{result.tokens_per_second:,.1f} tokens/s")


def cmd_jobs(args: argparse.Namespace) -> int:
    client = _client(args)
    command = args.jobs_command
    if command == "create":
        job = client.finetune.create(**_job_options(args))
        if args.wait:
            job = client.finetune.wait(job.id)
        _print(args, job)
        return 0 if job.status != "failed" else 1
    if command == "estimate":
        result = client.finetune.estimate(**_job_options(args))
        if args.json:
            print(result.model_dump_json(indent=2))
        else:
            _print_estimate(result)
        return 0 if result.fits else 1
    if command == "list":
        _print(args, client.finetune.list(limit=args.limit), ("id", "status", "model", "step", "fine_tuned_model"))
    elif command == "show":
        _print(args, client.finetune.get(args.job_id))
    elif command == "watch":
        job = client.finetune.wait(args.job_id, progress=True)
        _print(args, job)
        return 0 if job.status == "succeeded" else 1
    elif command == "cancel":
        _print(args, client.finetune.cancel(args.job_id))
    elif command == "events":
        for event in client.finetune.events(args.job_id):
            if args.json:
                print(event.model_dump_json())
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(event.created_at))
                print(f"{stamp} {event.level:5} {event.message}")
    elif command == "checkpoints":
        _print(args, client.finetune.checkpoints(args.job_id), ("step_number", "metrics", "location"))
    elif command == "plot":
        from .plot import job_curves, terminal_chart, write_png

        curves = job_curves(client, args.job_id)
        if args.png:
            print(write_png(curves, args.png))
        else:
            print(terminal_chart(curves, width=args.width, height=args.height, color=sys.stdout.isatty()))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    client = _client(args)
    _print(args, client.deployments.create(model=args.model, name=args.name, engine=args.engine))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    client = _client(args)
    path = client.models.export(
        args.model,
        format=args.format,
        dest=args.dest,
        precision=args.precision,
        device=args.device,
        adapters=args.adapters,
        verify=args.verify,
        overwrite=args.overwrite,
    )
    print(path)
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.deployments_command == "delete":
        client.deployments.delete(args.name)
    else:
        _print(args, client.deployments.list(), ("name", "model", "engine", "status"))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    client = _client(args)
    deployment = client.deployments.get(args.deployment)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}
    ]
    completion = deployment.chat(messages, max_tokens=args.max_tokens, temperature=args.temperature)
    print(completion.model_dump_json(indent=2) if args.json else completion.text)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    client = _client(args)
    _print(args, client.models.list(), ("id", "kind", "base_model", "path"))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .local.worker import main as worker_main

    home = str(args.home or default_home())
    return worker_main(["--home", home, "--idle-timeout", str(args.idle_timeout)])


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(home=Path(args.home) if args.home else None, steps=args.steps)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import cli

    return cli(args.rest, home=args.home)


def cmd_kaito(args: argparse.Namespace) -> int:
    from .kaito import cli

    return cli(args.rest)


# -------------------------------------------------------------------------------------------------- parser
def _add_job_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a job (``jobs create``, ``jobs estimate``); :func:`_job_options` reads them."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--training-file", required=True, help="a file id or a local JSONL path")
    parser.add_argument("--validation-file")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora", "dora", "full"])
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeat)")
    parser.add_argument("--suffix")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phitune", description="Fine-tune Phi-3 models: locally, on Azure, or on any OpenAI-compatible service."
    )
    parser.add_argument("--home", help="local state folder (default $PHITUNE_HOME or ~/.phitune)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline end-to-end fine-tune of tiny-phi3 on a bundled dataset")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    demo.set_defaults(func=cmd_demo)

    files = sub.add_parser("files", help="validate, upload and list datasets")
    files_sub = files.add_subparsers(dest="files_command", required=True)
    validate = files_sub.add_parser("validate", help="report every problem of a JSONL dataset, with line numbers")
    validate.add_argument("path")
    validate.add_argument("--model", default=None, help=f"count tokens for this model ({', '.join(catalog.names())})")
    validate.add_argument("--epochs", type=int, default=1)
    upload = files_sub.add_parser("upload", help="validate and store a dataset")
    upload.add_argument("path")
    upload.add_argument("--model", default=None)
    files_sub.add_parser("list", help="stored datasets")
    files.set_defaults(func=cmd_files)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    create = _add_job_options(jobs_sub.add_parser("create", help="submit a job"))
    create.add_argument("--wait", action="store_true", help="wait for the job and show progress")
    _add_job_options(
        jobs_sub.add_parser(
            "estimate",
            help="will it fit? peak memory, tokens and time per epoch on this machine (exit 1 if it does not fit)",
        )
    )
    listing = jobs_sub.add_parser("list")
    listing.add_argument("--limit", type=int, default=20)
    for name in ("show", "watch", "cancel", "events", "checkpoints"):
        jobs_sub.add_parser(name).add_argument("job_id")
    plot = jobs_sub.add_parser("plot", help="training and validation loss curves, in the terminal or as a PNG")
    plot.add_argument("job_id")
    plot.add_argument("--png", metavar="FILE", help="write a PNG image instead (matplotlib: the plot extra)")
    plot.add_argument("--width", type=int, help="chart width in columns (default: the terminal's)")
    plot.add_argument("--height", type=int, help="chart height in rows (default: the terminal's)")
    jobs.set_defaults(func=cmd_jobs)

    deploy = sub.add_parser("deploy", help="deploy a model for chat")
    deploy.add_argument("model")
    deploy.add_argument("--name", required=True)
    deploy.add_argument("--engine", choices=["torch", "onnx"], default="torch")
    deploy.set_defaults(func=cmd_deploy)

    export = sub.add_parser("export", help="export a model: PEFT adapter, merged transformers folder or ONNX Runtime")
    export.add_argument("model")
    export.add_argument("--format", choices=["onnx", "merged", "adapter"], required=True)
    export.add_argument("--dest", required=True, help="output folder (absent or empty unless --overwrite)")
    export.add_argument("--precision", choices=["fp32", "int4"], default="fp32")
    export.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    export.add_argument(
        "--adapters",
        choices=["merged", "separate"],
        default="merged",
        help="separate: ONNX base + <name>.onnx_adapter (more fine-tunes of the base can join --dest)",
    )
    export.add_argument("--no-verify", dest="verify", action="store_false", help="skip the PyTorch comparison")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=cmd_export)

    deployments = sub.add_parser("deployments", help="list or delete deployments")
    deployments_sub = deployments.add_subparsers(dest="deployments_command", required=True)
    deployments_sub.add_parser("list")
    deployments_sub.add_parser("delete").add_argument("name")
    deployments.set_defaults(func=cmd_deployments)

    chat = sub.add_parser("chat", help="send one chat message to a deployment")
    chat.add_argument("deployment")
    chat.add_argument("message")
    chat.add_argument("--system")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", help="base and fine-tuned models")
    models.set_defaults(func=cmd_models)

    worker = sub.add_parser("worker", help="run the local job worker in the foreground")
    worker.add_argument("--idle-timeout", type=float, default=3600.0)
    worker.set_defaults(func=cmd_worker)

    serve = sub.add_parser("serve", help="OpenAI-compatible fine-tuning and inference service", add_help=False)
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    serve.set_defaults(func=cmd_serve)

    kaito = sub.add_parser("kaito", help="emit Kaito tuning/inference workspaces", add_help=False)
    kaito.add_argument("rest", nargs=argparse.REMAINDER)
    kaito.set_defaults(func=cmd_kaito)
    return parser


_DELEGATED = ("serve", "kaito")  # commands that parse their own arguments (``--help`` included)


def main(argv: Sequence[str] | None = None) -> int:
    tokens = list(sys.argv[1:] if argv is None else argv)
    split = next((i for i, t in enumerate(tokens) if t in _DELEGATED), None)
    if split is not None and all(t.startswith("-") or tokens[i - 1] == "--home" for i, t in enumerate(tokens[:split])):
        args = build_parser().parse_args([*tokens[:split], tokens[split]])
        args.rest = tokens[split + 1 :]
    else:
        args = build_parser().parse_args(tokens)
    try:
        return int(args.func(args))
    except PhituneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
