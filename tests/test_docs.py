"""The documentation: every public name is documented, and every relative link in README.md resolves.

The API reference (docs/reference/*.md) renders docstrings with mkdocstrings, which leaves out an object without a
docstring; these tests fail instead. They read the code the way mkdocstrings does (griffe, statically), so they need
the ``docs`` extra. ``mkdocs build --strict`` (``make lint``) checks the links and anchors inside docs/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

import phitune

griffe = pytest.importorskip("griffe", reason="the docs extra (mkdocstrings) is not installed")

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
SOURCE = Path(phitune.__file__).resolve().parents[1]

_DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    loaded = griffe.load("phitune", search_paths=[str(SOURCE)], resolve_aliases=True, resolve_external=False)
    assert isinstance(loaded, griffe.Module)
    return loaded


def _targets() -> list[str]:
    """The objects the API reference renders (the ``::: path`` lines of docs/reference/*.md)."""
    return [m.group(1) for page in sorted(REFERENCE.glob("*.md")) for m in _DIRECTIVE.finditer(page.read_text())]


def _resolve(package: griffe.Module, path: str) -> griffe.Object:
    obj = package if path == "phitune" else package[path.removeprefix("phitune.")]
    return obj.final_target if isinstance(obj, griffe.Alias) else obj


def _documented(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and the public members mkdocstrings renders with it (its own, not inherited or imported)."""
    yield obj
    for name, member in obj.members.items():
        if name.startswith("_") or isinstance(member, griffe.Alias):
            continue
        if obj.is_module and obj.exports is not None and name not in obj.exports:
            continue
        if member.is_class or member.is_function or member.is_module or "property" in member.labels:
            yield from _documented(member)


def _covered(path: str, targets: set[str]) -> bool:
    return any(path == t or path.startswith(t + ".") for t in targets)


def test_the_reference_pages_name_objects_that_exist(package: griffe.Module) -> None:
    targets = _targets()
    assert targets, "docs/reference/*.md render nothing"
    for target in targets:
        _resolve(package, target)  # raises KeyError on a stale path


def test_every_rendered_object_has_a_docstring(package: griffe.Module) -> None:
    missing = sorted(
        {
            obj.path
            for target in _targets()
            for obj in _documented(_resolve(package, target))
            if obj.docstring is None or not obj.docstring.value.strip()
        }
    )
    assert not missing, f"public objects without a docstring (the API reference would leave them out): {missing}"


def test_every_public_name_is_in_the_reference(package: griffe.Module) -> None:
    targets = {_resolve(package, t).path for t in _targets()}
    names = [name for name in phitune.__all__ if not name.startswith("__")]
    absent = [name for name in names if not _covered(_resolve(package, f"phitune.{name}").path, targets)]
    assert not absent, f"phitune.__all__ names that docs/reference/*.md does not render: {absent}"


def test_every_resource_of_a_client_is_in_the_reference(package: griffe.Module) -> None:
    targets = {_resolve(package, t).path for t in _targets()}
    clients = [_resolve(package, f"phitune.{n}") for n in phitune.__all__ if n.endswith("Client")]
    assert clients
    resources = {
        member.annotation.canonical_path
        for client in clients
        for member in client.all_members.values()
        if member.is_attribute and isinstance(member.annotation, griffe.Expr)
    }
    resources = {path for path in resources if path.startswith("phitune.resources.")}
    assert resources, "found no resource properties on the clients"
    absent = sorted(path for path in resources if not _covered(path, targets))
    assert not absent, f"resources that docs/reference/client.md does not render: {absent}"


def _relative_links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)  # links inside code blocks are code
    return [link for link in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


def _anchors(markdown: str) -> set[str]:
    """The ids of a page's headings, as Python-Markdown's toc extension (MkDocs, and GitHub alike) makes them."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE)
    return {slugify(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", ""), "-") for heading in headings}


@pytest.mark.parametrize("document", ["README.md", "CHANGELOG.md", "benchmarks/README.md"])
def test_relative_links_resolve(document: str) -> None:
    source = ROOT / document
    broken = []
    for link in _relative_links(source.read_text()):
        target, _, anchor = unquote(link).partition("#")
        path = (source.parent / target).resolve() if target else source
        missing_anchor = anchor and path.suffix == ".md" and path.exists() and anchor not in _anchors(path.read_text())
        if not path.exists() or missing_anchor:
            broken.append(link)
    assert not broken, f"{document} links to what does not exist: {broken}"


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = "see [a](docs/none.md), [b](#nowhere), [c](https://example.com) and\n```\n[d](in-code.md)\n```\n"
    assert _relative_links(page) == ["docs/none.md", "#nowhere"]
    assert _anchors("# The `phitune serve` dashboard: routes\n## Which models, which offers\n") == {
        "the-phitune-serve-dashboard-routes",
        "which-models-which-offers",
    }
