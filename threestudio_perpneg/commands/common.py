"""Pieces shared by the package's command lines (:mod:`.smoke`, :mod:`.generate`, ``__main__``).

Private to the package: argparse value types, the one-line error exit, atomic file writes, the
library versions recorded in the JSON outputs and the tiny random Stable Diffusion checkpoint that
stands in when no ``--model`` is given. Importing it stays cheap (torch, diffusers and Pillow are
imported where they are used), so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, NoReturn, Optional, Sequence, Tuple, Type, Union

from ..common import io as _io

#: Folder of the tiny random checkpoint under ``--out`` when no ``--model`` is given.
TINY_DIR = "tiny-sd"
#: Seed of the tiny random checkpoint (independent of ``--seed`` so one build serves every run).
TINY_SEED = 0
#: Image size (pixels) and denoising steps with the tiny random checkpoint unless told otherwise:
#: its images are noise, so the default 512 px x 50 steps would spend a minute on nothing.
TINY_SIZE = 64
TINY_STEPS = 4


# ------------------------------------------------------------------------------ error exit
class CommandError(Exception):
    """A user-facing error of a command: one line, and the exit code it maps to."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CommandError):
    """A bad argument: one line naming it (``argument --x: ...``), exit code 2."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message, exit_code)

    @classmethod
    def argument(cls, arg: str, message: str) -> UsageError:
        """The error for command-line argument ``arg``."""
        return cls(f"argument {arg}: {message}")


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``PROG: error: argument --x: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_command(
    prog: str,
    run: Callable[[], object],
    error: Type[CommandError],
    *,
    interrupt: bool = True,
) -> int:
    """Call ``run()``; the exit code: 0, or ``error``'s after printing ``PROG: error: MESSAGE``.

    With ``interrupt``, Ctrl-C prints ``PROG: interrupted`` and exits 130 instead of a traceback.
    """
    try:
        run()
    except error as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if not interrupt:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def parse_and_run(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]],
    run: Callable[[argparse.Namespace], object],
    error: Type[CommandError],
) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``; kept as ``ns._argv`` for the JSON records) and
    :func:`run_command` ``run(ns)``; the exit code (``--help`` 0, a usage error 2)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = parser.parse_args(args_list)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    ns._argv = args_list
    return run_command(parser.prog, lambda: run(ns), error)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# -------------------------------------------------------------------------- argument types
def _int_at_least(value: str, lo: int, expected: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if n < lo:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return n


def positive_int(value: str) -> int:
    return _int_at_least(value, 1, "a positive integer")


def nonnegative_int(value: str) -> int:
    """An integer >= 0 (seeds)."""
    return _int_at_least(value, 0, "an integer >= 0")


def finite_float(value: str, what: str = "a number") -> float:
    """A finite float; ``what`` names the expected value when ``value`` is not a number."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return x


def size_arg(value: str) -> int:
    """Image height / width in pixels: a positive multiple of 8."""
    n = positive_int(value)
    if n % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 pixels, got {value!r}")
    return n


def add_size_arguments(group: Any) -> None:
    """``--height`` / ``--width`` (default: the model's; :data:`TINY_SIZE` with the tiny model)."""
    for flag in ("--height", "--width"):
        group.add_argument(
            flag,
            type=size_arg,
            default=None,
            help=f"pixels (default: the model's; {TINY_SIZE} with the tiny random model)",
        )


def fraction_arg(value: str) -> float:
    """A number in [0, 1]."""
    x = finite_float(value, "a fraction in [0, 1]")
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value!r}")
    return x


def device_arg(value: str, *, auto: bool = False, mps: bool = False) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` / ``mps`` when allowed)."""
    pattern = r"cpu|cuda(:\d+)?"
    expected = "cpu, cuda or cuda:N"
    if mps:
        pattern, expected = f"{pattern}|mps", "cpu, cuda, cuda:N or mps"
    if auto:
        pattern, expected = f"auto|{pattern}", f"auto, {expected}"
    if not re.fullmatch(pattern, value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return value


def split_text_weight(
    value: str, example: str, *, example_if_not_numeric: bool
) -> Tuple[str, float]:
    """``TEXT:WEIGHT`` split at the last colon: the text as given (not blank) and the weight.

    The weight is any float (callers check its sign and finiteness); ``example`` (e.g.
    ``"'a hat:-1.5'"``) is quoted in the error messages, in the one for a non-numeric weight only
    with ``example_if_not_numeric``.
    """
    text, sep, weight = value.rpartition(":")
    if not sep or not text.strip():
        raise argparse.ArgumentTypeError(f"expected TEXT:WEIGHT (e.g. {example}), got {value!r}")
    try:
        return text, float(weight)
    except ValueError:
        hint = f" (e.g. {example})" if example_if_not_numeric else ""
        raise argparse.ArgumentTypeError(
            f"expected TEXT:WEIGHT with a numeric weight{hint}, got {value!r}"
        ) from None


# ----------------------------------------------------------------------------------- outputs
#: Atomic writes live in :mod:`threestudio_perpneg.common.io`; the commands use these names.
atomic_write = _io.atomic_write
write_json = _io.write_json_atomic


def versions() -> Dict[str, str]:
    """Versions of this package, Python and the libraries that decide the outputs' bits."""
    import diffusers
    import PIL
    import torch
    import transformers

    from .. import __version__

    return {
        "threestudio_perpneg": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
    }


# -------------------------------------------------------------------------------- tiny model
def tiny_path(out: Path) -> Path:
    """Where the tiny random checkpoint lives under ``out`` (absolute: one path built or reused)."""
    return (out / TINY_DIR).absolute()


def build_tiny(path: Union[str, Path], *, announce: bool = True) -> str:
    """(Re)build the tiny random checkpoint (seed :data:`TINY_SEED`) at ``path``; its path.

    With ``announce``, says so on stderr first (the build takes a few seconds).
    """
    from ..tiny.builders import build_tiny_stable_diffusion

    if announce:
        print(f"building a tiny random Stable Diffusion checkpoint in {path} ...", file=sys.stderr)
    return str(build_tiny_stable_diffusion(path, seed=TINY_SEED, overwrite=True))


# ------------------------------------------------------------------------------- output paths
def output_file_slots(
    folder: Path, names: Tuple[str, ...], arg: str = "--out", *, folders: Tuple[str, ...] = ()
) -> None:
    """``ValueError`` (one line) when one of the files ``folder/name`` to be written is a folder,
    or one of the ``folders`` to be written into (``folder/name/``) is a file: checked before the
    slow work, so the run does not fail after it."""
    for name in names:
        if (folder / name).is_dir():
            raise ValueError(
                f"{arg} {str(folder)!r}: cannot write {name}: {str(folder / name)!r} is a folder, "
                "expected a file"
            )
    for name in folders:
        path = folder / name
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise ValueError(
                f"{arg} {str(folder)!r}: cannot write into {name}/: {str(path)!r} is a file, "
                "expected a folder"
            )
