"""What phitune's child processes share: dying with their parent, and an environment without phitune's secrets."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

SECRET_ENVIRONMENT = ("PHITUNE_API_KEY",)
"""Variables no child process receives: the server's API key is the server's alone."""

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: receive SIGKILL when the parent dies, so no orphan keeps running (Linux; elsewhere a
    no-op)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without :data:`SECRET_ENVIRONMENT`."""
    source = dict(os.environ) if base is None else base
    return {name: value for name, value in source.items() if name not in SECRET_ENVIRONMENT}
