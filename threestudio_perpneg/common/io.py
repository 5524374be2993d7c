"""Atomic file writes and JSON conversion (one copy of each, for every command and report).

A write goes to a temporary sibling of the target (same folder, so the same file system), is
flushed to disk, gets the permissions of a freshly created file (``0o666`` minus the umask) and
is moved over the target with ``os.replace``: a reader, or a resumed run, sees the old file or
the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Type, Union

__all__ = [
    "append_attempt",
    "atomic_write",
    "output_folder",
    "read_attempts",
    "read_json",
    "save_image_atomic",
    "to_jsonable",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Write through ``write(tmp_path)`` into a temporary sibling, then ``os.replace`` it over
    ``path`` (parent folders are created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # what ``write`` wrote reaches the disk before the rename
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """``data`` written atomically to ``path``."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: PathLike, text: str) -> None:
    """``text`` (UTF-8, newlines as given) written atomically to ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_json_atomic(
    path: PathLike,
    obj: Any,
    *,
    allow_nan: bool = False,
    default: Optional[Callable[[Any], Any]] = None,
) -> None:
    """``obj`` as indented JSON plus a newline, written atomically.

    NaN and infinities are refused unless ``allow_nan``; ``default`` converts what JSON cannot
    hold (e.g. ``str``), as in :func:`json.dumps`.
    """
    text = json.dumps(obj, indent=2, allow_nan=allow_nan, default=default) + "\n"
    write_text_atomic(path, text)


def pil_nearest() -> Any:
    """Pillow's nearest-neighbour resampling filter (``Image.Resampling.NEAREST`` from Pillow 9.1)."""
    from PIL import Image

    return getattr(Image, "Resampling", Image).NEAREST


def save_image_atomic(path: PathLike, image: Any, format: str = "PNG", **options: Any) -> None:
    """A PIL image (or anything with ``save(path, format=...)``) saved atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format=format, **options))


def output_folder(
    key: str, path: PathLike, *, create: bool = True, error: Type[Exception] = ValueError
) -> Path:
    """An output folder (``~`` expanded), created unless ``create=False``.

    Raises ``error`` with one line naming ``key`` when the path, or one of its parents, is a file,
    or when the folder cannot be created (permissions, read-only file system).
    """
    p = Path(path).expanduser()
    for ancestor in (p, *p.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                where = "" if ancestor == p else f" (a parent of {str(p)!r})"
                raise error(f"{key}: {str(ancestor)!r}{where} is a file, expected a folder")
            break
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise error(
                f"{key}: cannot create the folder {str(p)!r}: {err.strerror or err}"
            ) from None
    return p


def read_json(path: PathLike) -> Any:
    """The JSON content of a file.

    Raises:
        `FileNotFoundError`: ``'<path>' is not a file``.
        `ValueError`: ``'<path>' is not readable JSON: <reason>``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ValueError(f"{str(path)!r} is not readable JSON: {reason}") from None


def to_jsonable(value: Any, *, nonfinite: str = "null") -> Any:
    """A JSON-safe copy: mappings with ``str`` keys, tuples to lists, tensors / arrays / numpy
    scalars through ``tolist()``, other numbers through ``float``, anything else through ``str``.

    Non-finite floats become ``None`` (``nonfinite="null"``), their text (``"str"``: ``"nan"``,
    ``"inf"``) or stay (``"keep"``; then only ``json.dumps(allow_nan=True)`` takes them).
    """
    if nonfinite not in ("null", "str", "keep"):
        raise ValueError(f"nonfinite: expected 'null', 'str' or 'keep', got {nonfinite!r}")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, nonfinite=nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, nonfinite=nonfinite) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):
        return to_jsonable(value.tolist(), nonfinite=nonfinite)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value) or nonfinite == "keep":
            return value
        return None if nonfinite == "null" else str(value)
    try:
        return to_jsonable(float(value), nonfinite=nonfinite)
    except (TypeError, ValueError):
        return str(value)


def read_attempts(path: PathLike, key: str) -> Dict[str, Any]:
    """An attempts log: a JSON object with an ``attempts`` list (``{"attempts": []}`` when the
    file does not exist yet). Raises ``ValueError`` naming ``key`` and the file when it is not
    JSON or has no such list."""
    log = Path(path)
    if not log.exists():
        return {"attempts": []}
    try:
        data = json.loads(log.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}: {log} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("attempts"), list):
        raise ValueError(f"{key}: {log} has no 'attempts' list")
    return data


def append_attempt(path: PathLike, entry: Any, key: str, *, allow_nan: bool = False) -> None:
    """Append ``entry`` to the attempts log at ``path`` (:func:`read_attempts`), written
    atomically."""
    data = read_attempts(path, key)
    data["attempts"].append(entry)
    write_json_atomic(path, data, allow_nan=allow_nan)
