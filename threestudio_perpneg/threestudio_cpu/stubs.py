"""Import the real threestudio on a CPU-only machine.

threestudio imports a few CUDA-only or optional packages at module level
(`tinycudann`, `nvdiffrast.torch`, `controlnet_aux`, `torchvision`). On a CPU
machine these are missing, so `import_threestudio` registers stand-in modules
for the ones that cannot be imported. Any object taken from a stand-in raises
`StandInUsedError` when it is called or instantiated, so a test that reaches
CUDA-only code fails loudly instead of silently doing something else.

The `torchvision` stand-in exists only while `import threestudio` runs: left in
`sys.modules` it would make `importlib.util.find_spec("torchvision")` raise in
transformers / pytorch-lightning (a module whose `__spec__` is None).

`get_device()` (hard-coded to `cuda:{rank}` in threestudio) is patched to return
the CPU device, both at its definition and wherever it was imported by name.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

__all__ = [
    "StandInUsedError",
    "ThreestudioUnavailable",
    "import_threestudio",
    "patch_get_device",
]

# Modules `import threestudio` (and launch.py) pull in; imported in this order.
_THREESTUDIO_MODULES = (
    "threestudio",
    "threestudio.models",
    "threestudio.systems",
    "threestudio.data",
    "threestudio.systems.base",
    "threestudio.utils.config",
    "threestudio.utils.callbacks",
    "threestudio.utils.misc",
)

# Stand-ins kept for the whole session (threestudio may import them lazily).
_PERMANENT_STAND_INS: dict[str, tuple[str, ...]] = {
    "tinycudann": (),
    "nvdiffrast": ("torch",),
    "controlnet_aux": (),
}
# Stand-ins present only while threestudio is being imported.
_TEMPORARY_STAND_INS: dict[str, tuple[str, ...]] = {
    "torchvision": ("transforms", "transforms.functional", "models", "utils", "ops", "io"),
}
# Attributes of stand-ins that must work (as no-ops) because threestudio calls them on CPU code paths.
_NO_OPS = {("tinycudann", "free_temporary_memory")}


class ThreestudioUnavailable(RuntimeError):
    """threestudio (or one of its dependencies) cannot be imported here; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StandInUsedError(RuntimeError):
    """A test stand-in for a CUDA-only / missing package was actually used."""


class _StandInMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _make_stand_in_class(f"{cls.__qualname__}.{name}")


def _make_stand_in_class(qualname: str) -> type:
    def _fail(*_args: Any, **_kwargs: Any) -> Any:
        raise StandInUsedError(
            f"{qualname} comes from a test stand-in module (the real package is not available on "
            "this CPU-only machine); the code under test reached CUDA-only / optional threestudio "
            "functionality."
        )

    return _StandInMeta(
        qualname.rsplit(".", 1)[-1],
        (),
        {
            "__qualname__": qualname,
            "__new__": _fail,
            "__call__": _fail,
            "__module__": qualname.split(".", 1)[0],
        },
    )


def _no_op(*_args: Any, **_kwargs: Any) -> None:
    return None


def _make_stand_in_module(name: str) -> types.ModuleType:
    module = types.ModuleType(
        name, f"Test stand-in for {name!r} (see threestudio_perpneg/threestudio_cpu/stubs.py)."
    )
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []  # a package, so `import name.sub` looks in sys.modules
    module.__stand_in__ = True  # type: ignore[attr-defined]
    top = name.split(".", 1)[0]

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if (top, attr) in _NO_OPS:
            return _no_op
        return _make_stand_in_class(f"{name}.{attr}")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _real_module_importable(name: str) -> bool:
    """True if the real package imports; a failed import is cleaned out of sys.modules."""
    if name in sys.modules:
        return not getattr(sys.modules[name], "__stand_in__", False)
    try:
        if importlib.util.find_spec(name) is None:
            return False
    except (ImportError, ValueError):
        return False
    before = set(sys.modules)
    try:
        importlib.import_module(name)
    except Exception:  # e.g. a CUDA torchvision beside CPU torch raises RuntimeError
        for added in set(sys.modules) - before:
            if added == name or added.startswith(name + "."):
                del sys.modules[added]
        return False
    return True


def _install_stand_ins(spec: dict[str, tuple[str, ...]]) -> list[str]:
    """Registers stand-ins for the packages in `spec` that do not import; returns the module names added."""
    added: list[str] = []
    for top, subs in spec.items():
        if _real_module_importable(top):
            continue
        names = [top] + [f"{top}.{sub}" for sub in subs]
        for full in names:
            sys.modules[full] = _make_stand_in_module(full)
            added.append(full)
        for full in names[1:]:
            parent, child = full.rsplit(".", 1)
            setattr(sys.modules[parent], child, sys.modules[full])
    return added


@contextlib.contextmanager
def _temporary_stand_ins(spec: dict[str, tuple[str, ...]]) -> Iterator[None]:
    added = _install_stand_ins(spec)
    try:
        yield
    finally:
        for name in added:
            if getattr(sys.modules.get(name), "__stand_in__", False):
                del sys.modules[name]


def _cpu_device() -> Any:
    import torch

    return torch.device("cpu")


def patch_get_device(device_fn: Any = _cpu_device) -> int:
    """
    Makes threestudio's `get_device()` return the CPU device.

    Replaces `get_device` in every loaded module whose name starts with `threestudio` (this includes
    `threestudio_perpneg.*`), since threestudio modules import it by name. Call it again after importing
    more modules (custom extensions) that did `from threestudio.utils.misc import get_device` before the
    first patch. Returns the number of modules patched.
    """
    patched = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("threestudio"):
            continue
        current = getattr(module, "get_device", None)
        if callable(current) and current is not device_fn:
            module.get_device = device_fn  # type: ignore[attr-defined]
            patched += 1
    return patched


def _forget_modules(prefixes: tuple[str, ...], keep: set[str]) -> None:
    for name in list(sys.modules):
        if name in keep:
            continue
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


def _resolve_root(root: str | os.PathLike[str] | None) -> str:
    if root is None:
        root = os.environ.get("THREESTUDIO_ROOT") or None
    if root is None:
        raise ThreestudioUnavailable("THREESTUDIO_ROOT unset (point it at a threestudio checkout)")
    root = os.path.abspath(os.fspath(root))
    if not os.path.isfile(os.path.join(root, "threestudio", "__init__.py")):
        raise ThreestudioUnavailable(
            f"THREESTUDIO_ROOT={root} is not a threestudio checkout (no threestudio/__init__.py)"
        )
    return root


def import_threestudio(root: str | os.PathLike[str] | None = None) -> types.ModuleType:
    """
    Imports the real threestudio from the checkout at `root` on a CPU-only machine.

    Args:
        root: threestudio checkout root (the folder holding `threestudio/` and `launch.py`). None reads
            the `THREESTUDIO_ROOT` environment variable.

    Returns:
        The `threestudio` module, with its data, models and systems registered and `get_device`
        patched to CPU.

    Raises:
        ThreestudioUnavailable: The root is unset / not a checkout, or threestudio or one of its
            dependencies cannot be imported in this environment (the message says which).
    """
    resolved = _resolve_root(root)

    existing = sys.modules.get("threestudio")
    if existing is not None:
        loaded_from = os.path.dirname(
            os.path.dirname(os.path.abspath(getattr(existing, "__file__", None) or ""))
        )
        if not hasattr(existing, "find") or loaded_from != resolved:
            raise ThreestudioUnavailable(
                f"another 'threestudio' module is already imported (from {loaded_from!r}), not {resolved}"
            )
        patch_get_device()
        return existing

    # (a) Import the heavy libraries first, while no stand-in is in sys.modules.
    for dependency in ("torch", "diffusers", "transformers", "pytorch_lightning", "nerfacc"):
        try:
            importlib.import_module(dependency)
        except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
            raise ThreestudioUnavailable(
                f"threestudio dependency {dependency!r} not importable: {exc!r}"
            ) from exc

    before = set(sys.modules)
    path_added = resolved not in sys.path
    if path_added:
        sys.path.insert(0, resolved)
    # (b) Permanent stand-ins for CUDA-only packages.
    _install_stand_ins(_PERMANENT_STAND_INS)
    try:
        # (c) The torchvision stand-in only lives while threestudio is imported.
        with _temporary_stand_ins(_TEMPORARY_STAND_INS):
            for name in _THREESTUDIO_MODULES:
                importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        _forget_modules(("threestudio", "extern"), keep=before)
        if path_added:
            with contextlib.suppress(ValueError):
                sys.path.remove(resolved)
        raise ThreestudioUnavailable(f"import threestudio from {resolved} failed: {exc!r}") from exc

    # (d) get_device -> cpu, at the definition and in every module that imported it by name.
    patch_get_device()
    return sys.modules["threestudio"]
