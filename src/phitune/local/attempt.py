"""The trainer process of a local job (``python -m phitune.local.attempt``): opens the home's store and trains one
attempt of the job in it (:func:`phitune.runtime.attempt.run_attempt`). The worker starts it, under torchrun for a
distributed job, once per rank."""

from __future__ import annotations

import argparse
import sys

from .._process import die_with_parent
from ..runtime.attempt import run_attempt
from .store import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phitune.local.attempt")
    parser.add_argument("--home", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--attempt", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent()  # under torchrun each rank is the launcher's child: all die if the worker does
    return run_attempt(Store(args.home), args.job, args.attempt)


if __name__ == "__main__":
    sys.exit(main())
