"""The ``phitune`` command: help for everything, errors that name the option once, pause and resume, closed pipes."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from phitune.cli import SIGPIPE_STATUS, build_parser, main
from phitune.types import Distributed, Hyperparameters, LoRA, QLoRA

SOURCES = Path(__file__).resolve().parents[1] / "src"


def _run_phitune(*argv: str, **options: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{SOURCES}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "phitune", *argv], env=env, text=True, check=False, timeout=600, **options
    )  # type: ignore[call-overload, no-any-return]


def _parsers(parser: argparse.ArgumentParser, path: str = "phitune") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser``, with the command that reaches it."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _parsers(child, f"{path} {name}")
    return found


def test_every_command_and_argument_has_help() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{path} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {action.dest}")
    assert missing == []


def test_jobs_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["jobs", "--help"])
    out = capsys.readouterr().out
    for command in ("create", "estimate", "list", "show", "watch", "cancel", "pause", "resume", "events"):
        line = next(line for line in out.splitlines() if line.strip().startswith(command))
        assert len(line.split()) > 1, f"{command} has no help: {line!r}"


@pytest.mark.parametrize("command", ["create", "estimate"])
def test_job_help_lists_every_option_with_its_meaning_and_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["jobs", command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # wrapped lines joined
    for model in (Hyperparameters, LoRA, QLoRA, Distributed):
        for name, field in model.model_fields.items():
            if name == "type":
                continue
            assert field.description, f"{model.__name__}.{name} has no description"
            default = field.default if isinstance(field.default, str) else json.dumps(field.default)
            assert f"{name} {field.description}" in out and f"default {default})" in out, name


def test_an_unknown_hyperparameter_is_named_once_with_the_closest_name(
    tmp_path: Path, chat_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "home")
    status = main(["--home", home, "jobs", "create", "--model", "tiny-phi3", "--training-file", str(chat_file),
                   "--hp", "max_stepz=3"])  # fmt: skip
    assert status == 2
    assert capsys.readouterr().err == "error: hyperparameters.max_stepz: unknown field; did you mean 'max_steps'?\n"
    assert main(["--home", home, "--json", "files", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # the file uploaded for the job was deleted again


def test_method_and_distributed_options_reach_the_spec(
    tmp_path: Path, chat_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "home")
    status = main(["--home", home, "jobs", "create", "--model", "tiny-phi3", "--training-file", str(chat_file),
                   "--method", "qlora", "--method-option", "rr=4"])  # fmt: skip
    assert status == 2 and capsys.readouterr().err == "error: method.qlora.rr: unknown field; did you mean 'r'?\n"
    status = main(["--home", home, "jobs", "estimate", "--model", "tiny-phi3", "--training-file", str(chat_file),
                   "--distributed", "strategi=ddp"])  # fmt: skip
    assert capsys.readouterr().err == "error: distributed.strategi: unknown field; did you mean 'strategy'?\n"


def test_a_malformed_key_value_is_a_usage_error(chat_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "create", "--model", "tiny-phi3", "--training-file", str(chat_file), "--hp", "max_steps"])
    assert exit_.value.code == 2
    assert "argument --hp: 'max_steps' is not KEY=VALUE" in capsys.readouterr().err


def test_pause_and_resume_a_local_job(home: Path, chat_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--home", str(home), "--json", "jobs"]
    assert main([*args, "create", "--model", "tiny-phi3", "--training-file", str(chat_file),
                 "--hp", "max_steps=500", "--hp", "checkpoint_every=5"]) == 0  # fmt: skip
    job_id = json.loads(capsys.readouterr().out)["id"]
    try:
        assert main([*args, "pause", job_id]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "paused"
        assert main([*args, "resume", job_id]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "queued"
        assert main([*args, "resume", job_id]) == 2  # no longer paused
        assert "not paused" in capsys.readouterr().err
    finally:
        main([*args, "cancel", job_id])


@pytest.mark.parametrize("argv", [["--json", "files", "list"], ["jobs", "create", "--help"]])
def test_a_closed_pipe_ends_quietly(tmp_path: Path, argv: list[str]) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first write fails, as under `| head` once head has exited
    try:
        done = _run_phitune("--home", str(tmp_path), *argv, stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    assert done.stderr == ""  # no BrokenPipeError traceback
    assert done.returncode in (0, SIGPIPE_STATUS)  # argparse's help ignores a failed write


def test_files_models_and_deployments_one_at_a_time(
    home: Path, chat_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--home", str(home), "--json"]
    assert main([*args, "files", "upload", str(chat_file)]) == 0
    file_id = json.loads(capsys.readouterr().out)["id"]
    assert main([*args, "files", "show", file_id]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 8
    assert main([*args, "files", "delete", file_id]) == 0
    assert main([*args, "files", "show", file_id]) == 2 and "no file" in capsys.readouterr().err
    assert main([*args, "models", "tiny-phi3"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "tiny-phi3"
    assert main([*args, "deploy", "tiny-phi3", "--name", "base"]) == 0
    capsys.readouterr()
    assert main([*args, "deployments", "show", "base"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny-phi3"
    assert main([*args, "deployments", "delete", "base"]) == 0
    assert main([*args, "deployments", "show", "base"]) == 2


def test_the_printed_estimate_agrees_with_itself(
    tmp_path: Path, chat_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """time per epoch x tokens/s = tokens per epoch, in the figures as printed; a QLoRA base is said to be 4-bit."""
    lines = [f"Question {i}?" + " filler" * ((i * 53) % 400) for i in range(30)]  # widely spread lengths
    dataset = tmp_path / "mixed.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": line},
                       {"role": "assistant", "content": "Yes."}]}) + "\n" for line in lines))  # fmt: skip
    main(["--home", str(tmp_path / "home"), "jobs", "estimate", "--model", "Phi-3-mini-4k-instruct",
          "--training-file", str(dataset), "--method", "qlora", "--hp", "gradient_checkpointing=true"])  # fmt: skip
    out = capsys.readouterr().out
    assert "4-bit nf4 linear weights" in out.splitlines()[0] and "bf16 weights" not in out
    per_epoch = re.search(r"per epoch: 30 examples, ([\d,]+) tokens .*, ~(?:(\d+):(\d+):(\d+)|([\d.]+) s)$", out, re.M)
    speed = re.search(r"^speed: ~([\d,.]+) tokens/s \(([\d,.]+) trainable tokens/s", out, re.M)
    assert per_epoch and speed, out
    tokens = int(per_epoch[1].replace(",", ""))
    hours, minutes, secs, plain = per_epoch.groups()[1:]
    seconds = float(plain) if plain else int(hours) * 3600 + int(minutes) * 60 + int(secs)
    assert seconds * float(speed[1].replace(",", "")) == pytest.approx(tokens, rel=0.01)
