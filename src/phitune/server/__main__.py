"""``python -m phitune.server``: the same as ``phitune serve``."""

import sys

from . import cli

sys.exit(cli())
