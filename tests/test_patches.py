"""The trainer's patches of third-party classes apply on the versions they were verified on, and only there."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from phitune.trainer import patches

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> dict[str, str]:
    """The specifier of every requirement of pyproject.toml's optional dependencies, by distribution."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    found = {}
    for requirement in (Requirement(line) for lines in extras.values() for line in lines):
        found[requirement.name] = str(requirement.specifier)
    return found


def test_pyproject_bounds_the_patched_packages_to_the_verified_versions() -> None:
    from packaging.specifiers import SpecifierSet

    required = _requirements()
    for patch in patches.PATCHES.values():
        for package, specifier in patch.verified:
            assert SpecifierSet(required[package]) == SpecifierSet(specifier), (patch.name, package)


@pytest.mark.parametrize("name", sorted(patches.PATCHES))
def test_every_patch_applies_on_the_installed_versions(name: str) -> None:
    """The suite runs the patched classes: were a package outside the verified versions, it would test the
    libraries' own forwards instead."""
    assert patches.outside(name) == []
    assert patches.applies(name)


def test_a_patch_outside_its_versions_leaves_the_library_class(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    from phitune.trainer.norm import TrainingRMSNorm, use_training_rms_norm

    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "99.0" if name == "transformers" else real_version(name),
    )
    monkeypatch.setattr(patches, "applies", patches.applies.__wrapped__)  # uncached: reads the versions now
    norm = Phi3RMSNorm(8)
    assert use_training_rms_norm(norm) == 0 and type(norm) is Phi3RMSNorm
    (why,) = [note for note in patches.left_out() if "rms_norm" in note]
    assert "transformers 99.0 (verified: >=5.24,<5.26)" in why and patches.PATCHES_ENV in why
    monkeypatch.setenv(patches.PATCHES_ENV, "force")
    assert use_training_rms_norm(norm) == 1 and type(norm) is TrainingRMSNorm


def test_the_patches_registry_imports_no_patched_library() -> None:
    import subprocess

    code = (
        "import sys, phitune.trainer.patches as p; p.outside('lora_linear'); "
        "print(sorted({'torch', 'peft', 'transformers', 'bitsandbytes'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
