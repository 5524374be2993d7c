"""pytest fixtures for the threestudio tier. Re-export them from `tests/conftest.py`:

    from threestudio_support.fixtures import (  # noqa: F401
        nerfacc_cpu_calls,
        threestudio_module,
        threestudio_workdir,
    )

The tiny Stable Diffusion checkpoint comes from `tests/conftest.py` (`tiny_sd_path`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from threestudio_perpneg.threestudio_cpu.stubs import ThreestudioUnavailable, import_threestudio

__all__ = [
    "nerfacc_cpu_calls",
    "require_threestudio",
    "threestudio_module",
    "threestudio_workdir",
]


def require_threestudio(
    root: str | os.PathLike[str] | None = None, *, allow_module_level: bool = True
) -> Any:
    """Returns the imported threestudio module, or skips (module-level by default) with the reason."""
    try:
        return import_threestudio(root)
    except ThreestudioUnavailable as exc:
        pytest.skip(
            f"threestudio not importable: {exc.reason}", allow_module_level=allow_module_level
        )


@pytest.fixture(scope="session")
def threestudio_module() -> Any:
    """The real threestudio (from `THREESTUDIO_ROOT`), CPU-patched; skips the test when unavailable."""
    return require_threestudio(allow_module_level=False)


@pytest.fixture
def threestudio_workdir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A fresh working directory, chdir'ed into (prompt processors write `.threestudio_cache/` under cwd)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def nerfacc_cpu_calls() -> Iterator[Any]:
    """Installs the nerfacc CPU doubles for one test; yields the call counter (a `collections.Counter`)."""
    pytest.importorskip("nerfacc")
    from threestudio_perpneg.threestudio_cpu.nerfacc_cpu import installed

    with installed() as calls:
        yield calls
