"""The guider is loaded lazily: importing the package never imports diffusers' guiders, and a
diffusers without guiders gets one ImportError naming the version needed (both environments)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_package_import_does_not_import_diffusers_guiders() -> None:
    proc = _run(
        "import sys, threestudio_perpneg, threestudio_perpneg.guiders;"
        "print(sorted(m for m in sys.modules if m.startswith(('diffusers.guiders', "
        "'diffusers.modular_pipelines'))))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_without_guiders_the_import_error_names_the_version() -> None:
    import diffusers

    try:
        import diffusers.guiders.guider_utils  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip(f"diffusers {diffusers.__version__} has guiders (checked in the pinned env)")
    proc = _run("from threestudio_perpneg.guiders import PerpNegGuidance")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "diffusers >= 0.35.0" in last
    assert f"found diffusers {diffusers.__version__}" in last
