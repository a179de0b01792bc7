from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._client import Client
    from ..backends.base import Backend


class Resource:
    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def _backend(self) -> Backend:
        return self._client.backend
