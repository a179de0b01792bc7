"""A griffe extension for the documentation site: Sphinx roles in docstrings render as code.

Docstrings in phitune name other objects the Sphinx way (``:class:`~phitune.errors.DatasetError```), which reads well
in ``help()``. MkDocs renders Markdown, so each role becomes a code span: ``~a.b.C`` shows ``C``, ``a.b.C`` stays
whole. A reST link (```Kaito <https://...>`_``) becomes a Markdown link.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|data|meth|mod|attr|exc|obj|const):`(~?)([^`<]+?)(?:\s*<[^>]+>)?`")


_LINK = re.compile(r"`([^`<]+?)\s*<(https?://[^>]+)>`__?")


def _code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def strip_roles(text: str) -> str:
    """Rewrite Sphinx cross-reference roles in ``text`` as Markdown code spans, and reST links as Markdown links."""
    return _LINK.sub(r"[\1](\2)", _ROLE.sub(_code, text))


class RstRoles(griffe.Extension):
    """Rewrite Sphinx roles in every loaded object's docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
