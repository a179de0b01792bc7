"""The ``phitune`` command: a small CLI over the same :class:`phitune.Client`."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import textwrap
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import catalog
from ._client import Client, default_home
from ._third_party import quiet_libraries
from .errors import PhituneError
from .estimate import Estimate, GiB
from .types import Distributed, Hyperparameters, LoRA, QLoRA


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


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as (key, value): the value parsed as JSON where it parses (numbers, true/false, null, lists),
    else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


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
    elif args.files_command == "show":
        _print(args, client.files.get(args.file_id))
    elif args.files_command == "delete":
        client.files.delete(args.file_id)
    else:
        _print(args, client.files.list(), ("id", "filename", "bytes", "format", "examples"))
    return 0


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``finetune.create`` from the options :func:`_add_job_options` adds."""
    return {
        "model": args.model,
        "training_file": args.training_file,
        "validation_file": args.validation_file,
        "method": {"type": args.method, **dict(args.method_option)} if args.method_option else args.method,
        "hyperparameters": dict(args.hp),
        "distributed": dict(args.distributed),
        "suffix": args.suffix,
        "task": args.task,
    }


def _print_estimate(result: Estimate) -> None:
    weights = f"{result.weight_dtype} weights"
    if result.quantization is not None:
        weights = f"4-bit {result.quantization} linear weights, {result.weight_dtype} embeddings and head"
    print(
        f"{result.method} of {result.model} on {result.device} ({result.compute_dtype} compute, {weights}): "
        f"{result.trainable_parameters:,} of {result.parameters:,} parameters train"
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
    speed = f"speed: ~{_rate(result.tokens_per_second)} tokens/s"
    if result.trainable_tokens_per_second is not None:
        speed += f" ({_rate(result.trainable_tokens_per_second)} trainable tokens/s, the rate a job's metrics report)"
    print(speed)


def _rate(per_second: float) -> str:
    """Three significant digits below 100 (``6.58``, ``0.117``), whole numbers above (``1,234``)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


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
    elif command == "pause":
        _print(args, client.finetune.pause(args.job_id))
    elif command == "resume":
        _print(args, client.finetune.resume(args.job_id))
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
    elif args.deployments_command == "show":
        _print(args, client.deployments.get(args.name))
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
    if args.model:
        _print(args, client.models.get(args.model))
    else:
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
def _value_kind(annotation: Any) -> str:
    """How a field's values are written on the command line: ``int``, ``true|false``, ``linear|cosine|constant``..."""
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(value) for value in typing.get_args(annotation))
    if annotation is bool:
        return "true|false"
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if arguments and typing.get_origin(annotation) is not tuple:  # Optional[X], X | None
        return _value_kind(arguments[0]) if len(arguments) == 1 else "|".join(_value_kind(a) for a in arguments)
    if typing.get_origin(annotation) is tuple:
        return "JSON list"
    return getattr(annotation, "__name__", str(annotation))


def _fields_help(model: type[BaseModel], exclude: Sequence[str] = ()) -> str:
    """One entry per field of ``model``: its name, the values it takes, its default and its description, from the
    model itself (so the help cannot drift from the schema)."""
    lines = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        if field.default is PydanticUndefined:
            default = "required"
        else:
            default = field.default if isinstance(field.default, str) else json.dumps(field.default)
        text = f"{field.description or ''} ({_value_kind(field.annotation)}, default {default})".strip()
        lines.append(textwrap.fill(text, width=118, initial_indent=f"  {name:<28}", subsequent_indent=" " * 30))
    return "\n".join(lines)


def _job_options_help() -> str:
    return (
        "hyperparameters (--hp KEY=VALUE; a VALUE that parses as JSON is taken as JSON, else as a string):\n"
        f"{_fields_help(Hyperparameters)}\n\n"
        "method options of lora, dora and qlora (--method-option KEY=VALUE):\n"
        f"{_fields_help(LoRA, exclude=('type',))}\n"
        "qlora also takes:\n"
        f"{_fields_help(QLoRA, exclude=tuple(LoRA.model_fields))}\n\n"
        "distributed training (--distributed KEY=VALUE):\n"
        f"{_fields_help(Distributed)}"
    )


def _add_job_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of a job (``jobs create``, ``jobs estimate``); :func:`_job_options` reads them."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _job_options_help()
    parser.add_argument(
        "--model", required=True, help=f"a catalog name ({', '.join(catalog.names())}), a Hugging Face id or a folder"
    )
    parser.add_argument("--training-file", required=True, help="a file id (phitune files list) or a local JSONL path")
    parser.add_argument("--validation-file", help="a file id or a local JSONL path, for validation loss")
    parser.add_argument("--method", default="lora", choices=["lora", "qlora", "dora", "full"], help="default lora")
    for flag, what in (
        ("--method-option", "an option of the method, e.g. r=8"),
        ("--hp", "a hyperparameter, e.g. max_steps=40"),
        ("--distributed", "a multi-process option, e.g. strategy=ddp"),
    ):
        parser.add_argument(
            flag, type=_key_value, action="append", default=[], metavar="KEY=VALUE", help=f"{what} (repeat; see below)"
        )
    parser.add_argument(
        "--task", choices=["chat_completion", "text_completion"], help="default: inferred from the training data"
    )
    parser.add_argument("--suffix", help="part of the fine-tuned model's name: letters, digits, '-' or '_'")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phitune", description="Fine-tune Phi-3 models: locally, on Azure, or on any OpenAI-compatible service."
    )
    parser.add_argument("--home", help="local state folder (default $PHITUNE_HOME or ~/.phitune)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show what the libraries underneath print: warnings, banners, progress bars (phitune serve: "
        "--log-level debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="offline end-to-end fine-tune of tiny-phi3 on a bundled dataset")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    demo.set_defaults(func=cmd_demo)

    files = sub.add_parser("files", help="validate, upload, list and delete datasets")
    files_sub = files.add_subparsers(dest="files_command", required=True, metavar="COMMAND")
    validate = files_sub.add_parser("validate", help="report every problem of a JSONL dataset, with line numbers")
    validate.add_argument("path", help="the JSONL file")
    validate.add_argument("--model", default=None, help=f"count tokens for this model ({', '.join(catalog.names())})")
    validate.add_argument("--epochs", type=int, default=1, help="epochs for the estimated trained tokens (default 1)")
    upload = files_sub.add_parser("upload", help="validate and store a dataset")
    upload.add_argument("path", help="the JSONL file")
    upload.add_argument("--model", default=None, help="count tokens with this model's tokenizer")
    files_sub.add_parser("list", help="stored datasets")
    files_sub.add_parser("show", help="one stored dataset").add_argument("file_id", help="the file's id")
    files_sub.add_parser("delete", help="delete a stored dataset").add_argument("file_id", help="the file's id")
    files.set_defaults(func=cmd_files)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    create = _add_job_options(jobs_sub.add_parser("create", help="submit a job"))
    create.add_argument("--wait", action="store_true", help="wait for the job and show progress")
    _add_job_options(
        jobs_sub.add_parser(
            "estimate",
            help="will it fit? peak memory, tokens and time per epoch on this machine (exit 1 if it does not fit)",
        )
    )
    listing = jobs_sub.add_parser("list", help="jobs, newest first")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    for name, summary in (
        ("show", "one job"),
        ("watch", "follow a job with a progress bar until it ends (exit 1 unless it succeeds)"),
        ("cancel", "stop a job; what it produced is kept"),
        ("pause", "stop a job at a checkpoint, to resume later"),
        ("resume", "continue a paused job from its last checkpoint"),
        ("events", "a job's events, oldest first"),
        ("checkpoints", "a job's resumable checkpoints"),
    ):
        jobs_sub.add_parser(name, help=summary).add_argument("job_id", help="the job's id (phitune jobs list)")
    plot = jobs_sub.add_parser("plot", help="training and validation loss curves, in the terminal or as a PNG")
    plot.add_argument("job_id", help="the job's id (phitune jobs list)")
    plot.add_argument("--png", metavar="FILE", help="write a PNG image instead (matplotlib: the plot extra)")
    plot.add_argument("--width", type=int, help="chart width in columns (default: the terminal's)")
    plot.add_argument("--height", type=int, help="chart height in rows (default: the terminal's)")
    jobs.set_defaults(func=cmd_jobs)

    deploy = sub.add_parser("deploy", help="deploy a model for chat")
    deploy.add_argument("model", help="a fine-tuned model id (phitune models) or a base model")
    deploy.add_argument("--name", required=True, help="the deployment's name, used by phitune chat")
    deploy.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="the inference engine")
    deploy.set_defaults(func=cmd_deploy)

    export = sub.add_parser("export", help="export a model: PEFT adapter, merged transformers folder or ONNX Runtime")
    export.add_argument("model", help="a fine-tuned model id (phitune models) or a base model")
    export.add_argument("--format", choices=["onnx", "merged", "adapter"], required=True, help="what to write")
    export.add_argument("--dest", required=True, help="output folder (absent or empty unless --overwrite)")
    export.add_argument("--precision", choices=["fp32", "int4"], default="fp32", help="ONNX weights (default fp32)")
    export.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="ONNX target (default cpu)")
    export.add_argument(
        "--adapters",
        choices=["merged", "separate"],
        default="merged",
        help="separate: ONNX base + <name>.onnx_adapter (more fine-tunes of the base can join --dest)",
    )
    export.add_argument("--no-verify", dest="verify", action="store_false", help="skip the PyTorch comparison")
    export.add_argument("--overwrite", action="store_true", help="replace what --dest holds")
    export.set_defaults(func=cmd_export)

    deployments = sub.add_parser("deployments", help="list, show or delete deployments")
    deployments_sub = deployments.add_subparsers(dest="deployments_command", required=True, metavar="COMMAND")
    deployments_sub.add_parser("list", help="every deployment")
    deployments_sub.add_parser("show", help="one deployment").add_argument("name", help="the deployment's name")
    deployments_sub.add_parser("delete", help="delete a deployment").add_argument("name", help="the deployment's name")
    deployments.set_defaults(func=cmd_deployments)

    chat = sub.add_parser("chat", help="send one chat message to a deployment")
    chat.add_argument("deployment", help="the deployment's name (phitune deployments list)")
    chat.add_argument("message", help="the user message")
    chat.add_argument("--system", help="a system message: the one the model was fine-tuned with, if any")
    chat.add_argument("--max-tokens", type=int, default=128, help="longest reply in tokens (default 128)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default 0)")
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", help="base and fine-tuned models")
    models.add_argument("model", nargs="?", help="show this model only")
    models.set_defaults(func=cmd_models)

    worker = sub.add_parser("worker", help="run the local job worker in the foreground")
    worker.add_argument("--idle-timeout", type=float, default=3600.0, help="exit after this many idle seconds")
    worker.set_defaults(func=cmd_worker)

    serve = sub.add_parser("serve", help="OpenAI-compatible fine-tuning and inference service", add_help=False)
    serve.add_argument("rest", nargs=argparse.REMAINDER, help="the options of phitune serve --help")
    serve.set_defaults(func=cmd_serve)

    kaito = sub.add_parser("kaito", help="emit Kaito tuning/inference workspaces", add_help=False)
    kaito.add_argument("rest", nargs=argparse.REMAINDER, help="the options of phitune kaito --help")
    kaito.set_defaults(func=cmd_kaito)
    return parser


_DELEGATED = ("serve", "kaito")  # commands that parse their own arguments (``--help`` included)


SIGPIPE_STATUS = 128 + 13
"""The exit status of a command whose reader closed its output (``phitune jobs show ID | head``), as a shell reports
for ``cat``."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader went away: stop quietly. stdout is pointed at /dev/null so that the interpreter's last flush of
        # what is left in its buffer does not fail again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_STATUS


def _run(tokens: list[str]) -> int:
    split = next((i for i, t in enumerate(tokens) if t in _DELEGATED), None)
    if split is not None and all(t.startswith("-") or tokens[i - 1] == "--home" for i, t in enumerate(tokens[:split])):
        args = build_parser().parse_args([*tokens[:split], tokens[split]])
        args.rest = tokens[split + 1 :]  # phitune serve quiets the libraries by its own --log-level
    else:
        args = build_parser().parse_args(tokens)
        quiet_libraries(verbose=args.verbose)
    try:
        status = int(args.func(args))
    except PhituneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    sys.stdout.flush()  # a closed pipe shows here, inside main, rather than at the interpreter's exit
    return status


if __name__ == "__main__":
    sys.exit(main())
