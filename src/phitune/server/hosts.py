"""Loopback names, for the bind check and the server's host check. Light: the standard library only."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; False for every other name or address (``0.0.0.0`` included)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def names_this_machine(authority: str) -> bool:
    """Whether a ``host[:port]`` (``[::1]:8000`` too) names this machine by loopback."""
    host = urlsplit(f"//{authority}").hostname
    return host is not None and is_loopback(host)
