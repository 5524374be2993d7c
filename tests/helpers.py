"""Small helpers shared by the test modules (importable because tests/ is on sys.path)."""

from __future__ import annotations

from typing import Any, Callable

import pytest


def raises_naming(fn: Callable[[], Any], *needles: str) -> str:
    """Assert ``fn()`` raises ValueError whose message contains every needle; return the message."""
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg
