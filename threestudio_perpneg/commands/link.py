"""``threestudio-perpneg link``: install the plugin shim and the shipped configs into threestudio.

threestudio's ``launch.py`` executes ``custom/<folder>/__init__.py`` for every folder under
``<threestudio>/custom/``, and configs are passed relative to the threestudio root
(``--config configs/perpneg-dreamfusion.yaml``). :func:`link_into` therefore writes

* ``<root>/custom/threestudio-perpneg/__init__.py``: :data:`SHIM_SOURCE`, one import that registers
  the ``perpneg-*`` classes (so ``threestudio_perpneg`` must be importable from threestudio's
  Python, e.g. ``pip install -e <this repo>``);
* ``<root>/configs/<name>.yaml``: a copy of (or a symlink to) every YAML the package ships.

Every file is written atomically (temporary file in the target folder, then ``os.replace``). A run
that finds everything up to date changes nothing; a different file already at a target path is
only replaced with ``force=True``, and conflicts are detected before anything is written.

The YAMLs are found with ``importlib.resources`` in ``threestudio_perpneg.configs`` (setup.py maps
the repository's ``configs/`` there, for regular and editable installs); when that package is
missing or holds no YAMLs (a source checkout on ``PYTHONPATH``), the repository's ``configs/``
folder next to the package is used.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import pathlib
import sys
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

from ..common.io import write_bytes_atomic

__all__ = [
    "SHIM_SOURCE",
    "SHIM_RELPATH",
    "MODES",
    "NEXT_COMMAND",
    "shipped_configs",
    "is_threestudio_checkout",
    "link_into",
    "build_parser",
    "main",
]

#: Content of ``custom/threestudio-perpneg/__init__.py`` (identical to the repository's copy).
SHIM_SOURCE = (
    "import threestudio_perpneg.adapters  # noqa: F401  (registers the perpneg-* classes)\n"
)
#: Where the shim goes, relative to the threestudio root.
SHIM_RELPATH = pathlib.PurePosixPath("custom/threestudio-perpneg/__init__.py")
MODES = ("copy", "symlink")
#: What to run next, from the threestudio root.
NEXT_COMMAND = (
    "python launch.py --config configs/{config} --train --gpu 0 "
    'system.prompt_processor.prompt="a corgi"'
)
DEFAULT_CONFIG = "perpneg-dreamfusion.yaml"

PathLike = Union[str, "os.PathLike[str]"]
#: ``on_action(path, status)`` with status ``created``, ``up to date``, ``replaced`` (same content,
#: other form, e.g. a copy that becomes a symlink) or ``overwritten`` (different content, force).
ActionCallback = Callable[[pathlib.Path, str], None]


# --------------------------------------------------------------------------- shipped files
def _repo_configs_dir() -> Optional[pathlib.Path]:
    """``<repo>/configs`` when the package is imported from this repository's source tree."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    # The shim marks our checkout (an installed package's parent is site-packages, whose
    # configs/ folder, if any, belongs to someone else).
    if (repo / SHIM_RELPATH).is_file():
        return repo / "configs"
    return None


def _yamls_in(folder: object) -> List[object]:
    try:
        entries = list(folder.iterdir())  # type: ignore[attr-defined]
    except (FileNotFoundError, NotADirectoryError, OSError):
        return []
    return sorted(
        (e for e in entries if e.name.endswith(".yaml") and e.is_file()), key=lambda e: e.name
    )


def shipped_configs() -> List[pathlib.Path]:
    """The config YAMLs the package ships, sorted by name.

    First ``importlib.resources.files("threestudio_perpneg.configs")`` (installed or editable
    package), then, when that finds none, ``<repo>/configs`` next to the package (source checkout
    on ``PYTHONPATH``). May be empty.
    """
    found: List[object] = []
    try:
        found = _yamls_in(importlib.resources.files("threestudio_perpneg.configs"))
    except (ModuleNotFoundError, TypeError):
        found = []
    repo_configs = _repo_configs_dir()
    if not found and repo_configs is not None:
        found = _yamls_in(repo_configs)
    out = []
    for entry in found:
        if not isinstance(entry, pathlib.Path):
            # A zipped install: no real file to copy or link from.
            raise ValueError(
                f"configs: {entry} is not a file on disk (zipped install?); reinstall "
                "threestudio-perpneg as a regular or editable package"
            )
        out.append(entry)
    return out


# ------------------------------------------------------------------------ checkout checks
def _checkout_problems(root: pathlib.Path) -> List[str]:
    problems = []
    if not (root / "launch.py").is_file():
        problems.append("launch.py")
    if not (root / "threestudio" / "__init__.py").is_file():
        problems.append("threestudio/__init__.py")
    if not (root / "configs").is_dir():
        problems.append("configs/")
    return problems


def is_threestudio_checkout(path: PathLike) -> bool:
    """Whether ``path`` holds ``launch.py``, ``threestudio/__init__.py`` and a ``configs/`` folder."""
    root = pathlib.Path(path).expanduser()
    return root.is_dir() and not _checkout_problems(root)


# ------------------------------------------------------------------------- atomic writes
def _temp_name(target: pathlib.Path) -> pathlib.Path:
    while True:
        tmp = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
        if not os.path.lexists(tmp):
            return tmp


def _symlink_atomic(target: pathlib.Path, source: pathlib.Path) -> None:
    tmp = _temp_name(target)
    os.symlink(source, tmp)
    try:
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------- linking
class _Item(NamedTuple):
    target: pathlib.Path
    data: bytes  # the content the target must have
    source: Optional[pathlib.Path]  # symlink source (symlink mode only)


def _read(path: pathlib.Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _state(item: _Item) -> str:
    """``missing``, ``up to date``, ``same`` (same content, other form) or ``different``."""
    target = item.target
    if not os.path.lexists(target):
        return "missing"
    if target.is_dir():
        return "directory"
    if item.source is not None:
        if target.is_symlink() and os.path.realpath(target) == os.path.realpath(item.source):
            return "up to date"
    elif not target.is_symlink() and _read(target) == item.data:
        return "up to date"
    return "same" if _read(target) == item.data else "different"


def link_into(
    threestudio_root: PathLike,
    *,
    mode: str = "copy",
    force: bool = False,
    on_action: Optional[ActionCallback] = None,
) -> List[pathlib.Path]:
    """Install the plugin shim and the shipped YAMLs into a threestudio checkout.

    Args:
        threestudio_root: the threestudio checkout (holds ``launch.py``, ``threestudio/`` and
            ``configs/``).
        mode: ``"copy"`` copies the YAMLs, ``"symlink"`` links them (absolute links to the shipped
            files, so edits in an editable checkout show up in threestudio). The shim is always a
            regular file.
        force: replace files at the target paths whose content differs.
        on_action: called with ``(path, status)`` for every target, see :data:`ActionCallback`.

    Returns:
        The target paths, written or already up to date: the shim first, then the YAMLs by name.

    Raises:
        FileNotFoundError: ``threestudio_root`` does not exist.
        ValueError: it is not a threestudio checkout, or ``mode`` is unknown.
        FileExistsError: a different file is at a target path and ``force`` is false (nothing is
            written then), or a folder is in the way.
    """
    if mode not in MODES:
        raise ValueError(f"mode: unknown value {mode!r}, expected one of {MODES}")
    root = pathlib.Path(threestudio_root).expanduser().absolute()
    if not os.path.lexists(root) or (root.is_symlink() and not root.exists()):
        raise FileNotFoundError(f"threestudio root {root} does not exist")
    if not root.is_dir():
        raise ValueError(
            f"{root} is not a threestudio checkout: it is not a folder (expected a folder with "
            "launch.py, threestudio/ and configs/)"
        )
    problems = _checkout_problems(root)
    if problems:
        raise ValueError(
            f"{root} is not a threestudio checkout: missing {', '.join(problems)} (expected "
            "launch.py, threestudio/__init__.py and a configs/ folder)"
        )

    items = [_Item(root / SHIM_RELPATH, SHIM_SOURCE.encode("utf-8"), None)]
    for src in shipped_configs():
        data = src.read_bytes()
        source = src.resolve() if mode == "symlink" else None
        items.append(_Item(root / "configs" / src.name, data, source))

    states = [_state(item) for item in items]
    folders = [str(i.target) for i, s in zip(items, states) if s == "directory"]
    if folders:
        raise FileExistsError(
            f"{', '.join(folders)}: a folder is in the way of a file to write; move it away "
            "(--force does not remove folders)"
        )
    shim_dir = items[0].target.parent
    if os.path.lexists(shim_dir) and not shim_dir.is_dir():
        raise FileExistsError(
            f"{shim_dir}: expected a folder for the plugin shim, found a file; move it away"
        )
    conflicts = [str(i.target) for i, s in zip(items, states) if s == "different"]
    if conflicts and not force:
        raise FileExistsError(
            f"{', '.join(conflicts)} already exist{'s' if len(conflicts) == 1 else ''} with "
            "different content; use --force (force=True) to overwrite"
        )

    shim_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for item, state in zip(items, states):
        if state != "up to date":
            if item.source is None:
                write_bytes_atomic(item.target, item.data)
            else:
                _symlink_atomic(item.target, item.source)
        if on_action is not None:
            status = {"missing": "created", "same": "replaced", "different": "overwritten"}.get(
                state, state
            )
            on_action(item.target, status)
        out.append(item.target)
    return out


# -------------------------------------------------------------------------------- CLI
def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``link`` parser (``prog`` names the program in its messages)."""
    from .common import OneLineParser  # one-line usage errors, as every command

    parser = OneLineParser(
        prog=prog or "threestudio-perpneg link",
        description=(
            "Install the Perp-Neg plugin into a threestudio checkout: write "
            "custom/threestudio-perpneg/__init__.py and copy (or symlink) the shipped "
            "perpneg-*.yaml configs into THREESTUDIO_ROOT/configs/. Safe to run again."
        ),
    )
    parser.add_argument("threestudio_root", metavar="THREESTUDIO_ROOT", help="threestudio checkout")
    parser.add_argument(
        "--symlink", action="store_true", help="symlink the configs instead of copying them"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite target files whose content differs"
    )
    from .quiet import add_verbose_argument  # issue 9: quiet by default (commands/quiet.py)

    add_verbose_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``threestudio-perpneg link THREESTUDIO_ROOT [--symlink] [--force]``; returns the exit code.

    ``argv`` holds the arguments after ``link`` (``threestudio_perpneg.__main__`` strips the
    subcommand; default ``sys.argv[1:]``, for ``python -m threestudio_perpneg.commands.link ROOT``). Errors
    print one line to stderr and return 2; ``--help`` returns 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2

    root = pathlib.Path(args.threestudio_root).expanduser().absolute()
    mode = "symlink" if args.symlink else "copy"
    lines: List[str] = []

    def record(path: pathlib.Path, status: str) -> None:
        lines.append(f"  {status:<12}{path.relative_to(root)}")

    try:
        targets = link_into(root, mode=mode, force=args.force, on_action=record)
    except (OSError, ValueError) as err:
        print(f"threestudio-perpneg link: error: {err}", file=sys.stderr)
        return 2

    print(f"Linked threestudio-perpneg into {root} ({mode}):")
    print("\n".join(lines))
    names = [t.name for t in targets[1:]]
    if not names:
        print(
            "threestudio-perpneg link: warning: the package ships no config YAMLs; only the "
            "plugin shim was installed",
            file=sys.stderr,
        )
    config = DEFAULT_CONFIG if DEFAULT_CONFIG in names or not names else names[0]
    print("threestudio_perpneg must be importable from threestudio's Python (pip install -e ...).")
    print("Next, run from the threestudio root:")
    print(f"  cd {root}")
    print(f"  {NEXT_COMMAND.format(config=config)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
