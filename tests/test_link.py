"""``threestudio-perpneg link``: shim and configs installed into a (fake) threestudio checkout."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import List, Tuple

import pytest

from threestudio_perpneg.commands import link
from threestudio_perpneg.commands.link import (
    SHIM_SOURCE,
    is_threestudio_checkout,
    link_into,
    main,
    shipped_configs,
)

REPO = Path(__file__).resolve().parents[1]
REPO_SHIM = REPO / "custom" / "threestudio-perpneg" / "__init__.py"
REPO_YAMLS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
NEXT = (
    "python launch.py --config configs/perpneg-dreamfusion.yaml --train --gpu 0 "
    'system.prompt_processor.prompt="a corgi"'
)


@pytest.fixture()
def ts_root(tmp_path: Path) -> Path:
    """A fake threestudio checkout: launch.py, threestudio/__init__.py and configs/."""
    root = tmp_path / "threestudio"
    (root / "threestudio").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "launch.py").write_text("# launch\n")
    (root / "threestudio" / "__init__.py").write_text("")
    (root / "configs" / "dreamfusion-sd.yaml").write_text("name: dreamfusion-sd\n")
    return root


def _shim(root: Path) -> Path:
    return root / "custom" / "threestudio-perpneg" / "__init__.py"


def _expected(root: Path) -> List[Path]:
    return [_shim(root)] + [root / "configs" / p.name for p in shipped_configs()]


def _snapshot(root: Path) -> List[Tuple[str, bool, bytes, int]]:
    """(relative path, is symlink, content, mtime) of every file under ``root``."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        out.append(
            (str(p.relative_to(root)), p.is_symlink(), p.read_bytes(), os.lstat(p).st_mtime_ns)
        )
    return out


def _no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob(".*.tmp")]
    assert leftovers == [], leftovers


# --------------------------------------------------------------------------- shipped files
def test_shim_source_equals_repo_shim() -> None:
    assert REPO_SHIM.read_text(encoding="utf-8") == SHIM_SOURCE


def test_shipped_configs_are_the_repo_yamls() -> None:
    # Through importlib.resources when installed, else the repo's configs/ fallback.
    found = shipped_configs()
    assert [p.name for p in found] == REPO_YAMLS
    assert all(p.is_file() for p in found)


def test_repo_yamls_found_through_importlib_resources() -> None:
    try:
        folder = importlib.resources.files("threestudio_perpneg.configs")
    except ModuleNotFoundError:
        pytest.skip(
            "threestudio_perpneg is imported from the source tree without setup.py's package_dir "
            "mapping (e.g. PYTHONPATH), so threestudio_perpneg.configs does not exist; link.py "
            "falls back to <repo>/configs (covered by test_shipped_configs_are_the_repo_yamls)"
        )
    names = sorted(e.name for e in folder.iterdir() if e.name.endswith(".yaml"))
    assert names == REPO_YAMLS


# ------------------------------------------------------------------------------ checkout
def test_is_threestudio_checkout(ts_root: Path, tmp_path: Path) -> None:
    assert is_threestudio_checkout(ts_root)
    assert is_threestudio_checkout(str(ts_root))
    assert not is_threestudio_checkout(tmp_path / "missing")
    assert not is_threestudio_checkout(ts_root / "launch.py")
    (ts_root / "threestudio" / "__init__.py").unlink()
    assert not is_threestudio_checkout(ts_root)


# ---------------------------------------------------------------------------------- copy
def test_link_copy_writes_shim_and_configs(ts_root: Path) -> None:
    written = link_into(ts_root)
    assert written == _expected(ts_root)
    assert _shim(ts_root).read_text(encoding="utf-8") == REPO_SHIM.read_text(encoding="utf-8")
    assert not _shim(ts_root).is_symlink()
    for src in shipped_configs():
        target = ts_root / "configs" / src.name
        assert target.is_file() and not target.is_symlink()
        assert target.read_bytes() == src.read_bytes()
        if (REPO / "configs" / src.name).is_file():
            assert target.read_bytes() == (REPO / "configs" / src.name).read_bytes()
    # threestudio's own configs are left alone.
    assert (ts_root / "configs" / "dreamfusion-sd.yaml").read_text() == "name: dreamfusion-sd\n"
    _no_temp_files(ts_root)


def test_link_is_idempotent(ts_root: Path) -> None:
    first = link_into(ts_root)
    before = _snapshot(ts_root)
    actions: List[Tuple[Path, str]] = []
    second = link_into(ts_root, on_action=lambda p, s: actions.append((p, s)))
    assert second == first
    assert _snapshot(ts_root) == before
    assert [s for _, s in actions] == ["up to date"] * len(first)


def test_conflicting_file_needs_force(ts_root: Path) -> None:
    if not REPO_YAMLS:
        pytest.skip("no YAMLs ship yet (the shim conflict is covered separately)")
    target = ts_root / "configs" / REPO_YAMLS[0]
    target.write_text("mine: true\n")
    with pytest.raises(FileExistsError) as info:
        link_into(ts_root)
    assert str(target) in str(info.value)
    assert "--force" in str(info.value)
    # Conflicts are found before anything is written.
    assert target.read_text() == "mine: true\n"
    assert not _shim(ts_root).exists()
    written = link_into(ts_root, force=True)
    assert written == _expected(ts_root)
    assert target.read_bytes() != b"mine: true\n"
    assert _shim(ts_root).read_text(encoding="utf-8") == SHIM_SOURCE
    _no_temp_files(ts_root)


def test_conflicting_shim_needs_force(ts_root: Path) -> None:
    _shim(ts_root).parent.mkdir(parents=True)
    _shim(ts_root).write_text("print('other plugin')\n")
    with pytest.raises(FileExistsError, match="--force"):
        link_into(ts_root)
    assert _shim(ts_root).read_text() == "print('other plugin')\n"
    link_into(ts_root, force=True)
    assert _shim(ts_root).read_text(encoding="utf-8") == SHIM_SOURCE


def test_folder_in_the_way_is_never_removed(ts_root: Path) -> None:
    (_shim(ts_root)).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="folder"):
        link_into(ts_root, force=True)
    assert _shim(ts_root).is_dir()


def test_failed_write_leaves_target_and_no_temp_file(
    ts_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(link.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        link_into(ts_root)
    assert not _shim(ts_root).exists()
    _no_temp_files(ts_root)


# ------------------------------------------------------------------------------- symlink
def test_link_symlink_mode(ts_root: Path) -> None:
    written = link_into(ts_root, mode="symlink")
    assert written == _expected(ts_root)
    assert not _shim(ts_root).is_symlink()
    assert _shim(ts_root).read_text(encoding="utf-8") == SHIM_SOURCE
    for src in shipped_configs():
        target = ts_root / "configs" / src.name
        assert target.is_symlink()
        assert Path(os.path.realpath(target)) == src.resolve()
    before = _snapshot(ts_root)
    assert link_into(ts_root, mode="symlink") == written
    assert _snapshot(ts_root) == before
    _no_temp_files(ts_root)


def test_switching_modes_needs_no_force(ts_root: Path) -> None:
    link_into(ts_root, mode="symlink")
    actions: List[Tuple[Path, str]] = []
    link_into(ts_root, mode="copy", on_action=lambda p, s: actions.append((p, s)))
    for src in shipped_configs():
        target = ts_root / "configs" / src.name
        assert not target.is_symlink() and target.read_bytes() == src.read_bytes()
    assert [s for _, s in actions[1:]] == ["replaced"] * len(shipped_configs())
    link_into(ts_root, mode="symlink")
    assert all((ts_root / "configs" / s.name).is_symlink() for s in shipped_configs())


def test_dangling_symlink_is_a_conflict(ts_root: Path, tmp_path: Path) -> None:
    if not REPO_YAMLS:
        pytest.skip("no YAMLs ship yet")
    target = ts_root / "configs" / REPO_YAMLS[0]
    os.symlink(tmp_path / "gone.yaml", target)
    with pytest.raises(FileExistsError, match="--force"):
        link_into(ts_root, mode="symlink")
    link_into(ts_root, mode="symlink", force=True)
    assert Path(os.path.realpath(target)) == shipped_configs()[0].resolve()


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "remove", ["launch.py", "threestudio/__init__.py", "configs"], ids=["launch", "pkg", "cfg"]
)
def test_not_a_checkout(ts_root: Path, remove: str) -> None:
    path = ts_root / remove
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(ValueError) as info:
        link_into(ts_root)
    msg = str(info.value)
    assert str(ts_root) in msg
    for expected in ("launch.py", "threestudio/", "configs/"):
        assert expected in msg
    assert not (ts_root / "custom").exists()


def test_root_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match="not a threestudio checkout"):
        link_into(f)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        link_into(missing)
    assert str(missing) in str(info.value)


def test_unknown_mode(ts_root: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        link_into(ts_root, mode="hardlink")


# ----------------------------------------------------------------------------------- CLI
def test_main_links_and_prints_next_command(
    ts_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(ts_root)]) == 0
    out = capsys.readouterr().out
    assert str(ts_root) in out
    assert "created" in out
    assert "custom/threestudio-perpneg/__init__.py" in out
    for name in REPO_YAMLS:
        assert f"configs/{name}" in out
    if "perpneg-dreamfusion.yaml" in REPO_YAMLS:
        assert NEXT in out
    assert _shim(ts_root).read_text(encoding="utf-8") == SHIM_SOURCE

    assert main([str(ts_root)]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "created" not in out


def test_main_symlink_flag(ts_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(ts_root), "--symlink"]) == 0
    assert "(symlink)" in capsys.readouterr().out
    assert all((ts_root / "configs" / n).is_symlink() for n in REPO_YAMLS)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err + captured.out
    return err


def test_main_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    err = _one_line_error(capsys)
    assert str(tmp_path / "nowhere") in err and "does not exist" in err


def test_main_not_a_checkout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "not a threestudio checkout" in err and "launch.py" in err


def test_main_conflict_then_force(ts_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _shim(ts_root).parent.mkdir(parents=True)
    _shim(ts_root).write_text("# other\n")
    assert main([str(ts_root)]) == 2
    err = _one_line_error(capsys)
    assert str(_shim(ts_root)) in err and "--force" in err
    assert main([str(ts_root), "--force"]) == 0
    assert "overwritten" in capsys.readouterr().out
    assert _shim(ts_root).read_text(encoding="utf-8") == SHIM_SOURCE


def test_main_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "THREESTUDIO_ROOT" in capsys.readouterr().err
    assert main(["--bogus"]) == 2
    capsys.readouterr()
    assert main(["--help"]) == 0
    assert "--symlink" in capsys.readouterr().out


def test_package_command_line_dispatches_link(
    ts_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ``threestudio-perpneg link ROOT`` (console script / python -m threestudio_perpneg).
    from threestudio_perpneg.__main__ import main as package_main

    assert package_main(["link", str(ts_root), "--symlink"]) == 0
    assert "(symlink)" in capsys.readouterr().out
    assert _shim(ts_root).read_text(encoding="utf-8") == SHIM_SOURCE
    assert package_main(["link", str(ts_root / "nowhere")]) == 2
    _one_line_error(capsys)
