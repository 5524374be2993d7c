"""Input checks shared by the library entry points and the commands (one copy of each).

Every check returns the normalised value or raises ``error`` (``ValueError`` by default; the sweep
passes its ``SweepError``) with one line ``"<key>: expected ..., got <value>"``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterable, List, Literal, Optional, Sequence, Type

__all__ = [
    "MAX_SEEDS",
    "SEED_MAX_64",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_name",
    "check_names",
    "check_seeds",
    "check_sequence",
    "check_text",
    "parse_seed_text",
    "parse_seeds",
    "slug",
    "unique_slugs",
]

#: Most seeds a seed text or list may hold (guards against "0-999999999").
MAX_SEEDS = 10_000
#: Largest seed a ``torch.Generator`` takes.
SEED_MAX_64 = 2**64 - 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SEED_ITEM_RE = re.compile(r"(\d+)(?:\s*-\s*(\d+))?", re.ASCII)


def _bound_text(lo: Optional[float], hi: Optional[float]) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def check_int(
    key: str,
    value: Any,
    lo: Optional[int] = None,
    hi: Optional[int] = None,
    *,
    error: Type[Exception] = ValueError,
) -> int:
    """An integer (not a bool; numpy integers too) in ``[lo, hi]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{key}: expected an integer{_bound_text(lo, hi)}, got {value!r}")
    n = int(value)
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise error(f"{key}: expected an integer{_bound_text(lo, hi)}, got {value!r}")
    return n


def check_float(
    key: str,
    value: Any,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    *,
    error: Type[Exception] = ValueError,
) -> float:
    """A finite real number (not a bool) in ``[lo, hi]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{key}: expected a finite number{_bound_text(lo, hi)}, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise error(f"{key}: expected a finite number{_bound_text(lo, hi)}, got {value!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise error(f"{key}: expected a value{_bound_text(lo, hi)}, got {value!r}")
    return x


def check_bool(key: str, value: Any, *, error: Type[Exception] = ValueError) -> bool:
    """``True`` or ``False`` (not 0/1, not strings)."""
    if not isinstance(value, bool):
        raise error(f"{key}: expected true or false, got {value!r}")
    return value


def check_text(key: str, value: Any, *, error: Type[Exception] = ValueError) -> str:
    """A non-blank string, stripped."""
    if not isinstance(value, str) or not value.strip():
        raise error(f"{key}: expected a non-empty string, got {value!r}")
    return value.strip()


def check_name(key: str, value: Any, *, error: Type[Exception] = ValueError) -> str:
    """A name of letters, digits, ``_ . -`` starting with a letter or digit (safe in paths)."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise error(
            f"{key}: expected a name of letters, digits, '_', '.', '-' (starting with a letter or "
            f"digit), got {value!r}"
        )
    return value


def check_sequence(key: str, value: Any, what: str) -> List[Any]:
    """``value`` as a list (a string is not a sequence here); ``what`` names the items."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{key}: expected a sequence of {what}, got {value!r}")
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{key}: expected a sequence of {what}, got {value!r}") from None


def check_choice(
    key: str,
    value: Any,
    allowed: Sequence[Any],
    *,
    what: str = "name",
    error: Type[Exception] = ValueError,
) -> str:
    """One of ``allowed``; the message says ``unknown <what>``."""
    if value not in allowed:
        raise error(f"{key}: unknown {what} {value!r}, expected one of {tuple(allowed)}")
    return str(value)


def check_names(key: str, values: Any, allowed: Sequence[str], *, what: str = "name") -> List[str]:
    """Some of ``allowed``, as a list or a comma/space separated string; not empty, no repeats."""
    if isinstance(values, str):
        values = [p.strip() for p in re.split(r"[,\s]+", values) if p.strip()]
    try:
        items = list(values)
    except TypeError:
        raise ValueError(f"{key}: expected some of {list(allowed)}, got {values!r}") from None
    if not items:
        raise ValueError(f"{key}: expected at least one of {list(allowed)}, got none")
    for item in items:
        if item not in allowed:
            raise ValueError(f"{key}: unknown {what} {item!r}, expected some of {list(allowed)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{key}: a {what} is repeated in {items}")
    return items


# ------------------------------------------------------------------------------------- seeds
def parse_seed_text(
    text: Any,
    key: str = "seeds",
    *,
    max_seed: int = SEED_MAX_64,
    max_count: int = MAX_SEEDS,
    error: Type[Exception] = ValueError,
) -> List[int]:
    """``"0-7"`` (inclusive), ``"1,3,5"``, ``"30"`` or ``"0-3, 10"`` as a list of seeds.

    Raises ``error`` naming ``key`` for empty text or items, non-numbers, negative numbers,
    reversed ranges (``"7-0"``), seeds above ``max_seed`` or more than ``max_count`` seeds.
    """
    if not isinstance(text, str) or not text.strip():
        raise error(f"{key}: expected e.g. '0-7', '1,3,5' or '30', got {text!r}")
    out: List[int] = []
    for item in text.split(","):
        item = item.strip()
        m = _SEED_ITEM_RE.fullmatch(item)
        if m is None:
            raise error(
                f"{key}: {item!r} in {text!r} is not a non-negative integer or a range 'a-b'"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise error(f"{key}: range {item!r} in {text!r} is reversed (expected a <= b)")
        if hi > max_seed:
            raise error(f"{key}: {hi} in {text!r} exceeds {max_seed}")
        if len(out) + (hi - lo + 1) > max_count:
            raise error(f"{key}: {text!r} expands to more than {max_count} seeds")
        out.extend(range(lo, hi + 1))
    return out


def check_seeds(
    value: Any,
    key: str = "seeds",
    *,
    max_seed: int = SEED_MAX_64,
    unique: bool = False,
    text: bool = False,
    error: Type[Exception] = ValueError,
) -> List[int]:
    """Seeds from a sequence of integers or one integer (with ``text``, also a seed text).

    Each seed is in ``[0, max_seed]``; the list is not empty and, with ``unique``, holds no seed
    twice.
    """
    if isinstance(value, str) and text:
        items: List[Any] = parse_seed_text(value, key, max_seed=max_seed, error=error)
    elif isinstance(value, (str, bytes)):
        raise error(
            f"{key}: expected a sequence of integers, got the string {value!r} (use parse_seeds)"
        )
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise error(f"{key}: expected a sequence of integers, got {value!r}") from None
    if not items:
        raise error(f"{key}: expected at least one seed, got none")
    seeds = [check_int(f"{key}[{i}]", s, 0, max_seed, error=error) for i, s in enumerate(items)]
    if unique:
        seen = set()
        for s in seeds:
            if s in seen:
                raise error(f"{key}: seed {s} given twice")
            seen.add(s)
    return seeds


def parse_seeds(
    value: Any,
    key: str = "seeds",
    *,
    forms: Literal["text", "any"] = "text",
    max_seed: int = SEED_MAX_64,
    max_count: int = MAX_SEEDS,
    unique: bool = False,
    error: Type[Exception] = ValueError,
) -> List[int]:
    """Seeds from a seed text (``"0-7,9"``) or, with ``forms="any"``, also from one integer or a
    list/tuple of integers (a config value).

    The one seed parser of the package: the sampler and ``generate`` use the defaults (text only,
    64-bit seeds, ``ValueError``); the sweep passes ``forms="any"``, its ``2**32 - 1`` limit,
    ``unique=True`` and ``SweepError``.

    Args:
        value: the seed text, or (``forms="any"``) an integer or a list/tuple of integers.
        key: the name in error messages.
        forms: ``"text"`` (a seed text only) or ``"any"``.
        max_seed: the largest seed allowed.
        max_count: the most seeds a text may expand to.
        unique: no seed may be given twice.
        error: the exception class raised, with one line naming ``key``.
    """
    if forms == "text":
        seeds = parse_seed_text(value, key, max_seed=max_seed, max_count=max_count, error=error)
        return (
            check_seeds(seeds, key, max_seed=max_seed, unique=True, error=error)
            if unique
            else seeds
        )
    if isinstance(value, bool) or value is None:
        raise error(f"{key}: expected integers, a list or a range string like '0-3', got {value!r}")
    if isinstance(value, str):
        if not value.strip():
            raise error(f"{key}: empty seed string")
        value = parse_seed_text(value, key, max_seed=max_seed, max_count=max_count, error=error)
    elif not isinstance(value, (int, list, tuple)):
        raise error(f"{key}: expected integers, a list or a range string, got {value!r}")
    return check_seeds(value, key, max_seed=max_seed, unique=unique, error=error)


# ------------------------------------------------------------------------------------- slugs
def slug(
    text: str,
    *,
    sep: str = "_",
    limit: Optional[int] = None,
    lower: bool = True,
    keep: str = "",
    fallback: str = "item",
) -> str:
    """``text`` as a file-name part: runs of other characters than letters, digits and ``keep``
    become ``sep``; lower-cased unless ``lower=False``; at most ``limit`` characters; ``fallback``
    when nothing is left."""
    letters = "a-z0-9" if lower else "A-Za-z0-9"
    s = re.sub(f"[^{letters}{re.escape(keep)}]+", sep, text.lower() if lower else text)
    s = s.strip(sep)
    if limit is not None:
        s = s[:limit].rstrip(sep)
    return s or fallback


def unique_slugs(names: Iterable[str], **slug_options: Any) -> List[str]:
    """:func:`slug` of each name, later repeats suffixed ``-2``, ``-3`` ..."""
    used: dict = {}
    out = []
    for name in names:
        s = slug(name, **slug_options)
        if s in used:
            used[s] += 1
            s = f"{s}-{used[s]}"
        else:
            used[s] = 1
        out.append(s)
    return out
