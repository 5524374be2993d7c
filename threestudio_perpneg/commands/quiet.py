"""Quiet by default: third-party logging, loading bars and known warnings off unless ``--verbose``.

diffusers, transformers and accelerate print to stderr while a model loads: the
``low_cpu_mem_usage`` notice when accelerate is missing, "Loading pipeline components..." and
"Loading weights" bars (shown even with ``--no-progress``, which only governs our own bars), the
"requires torchvision" fallback notices of transformers 5, "Writing model shards" when the tiny
checkpoint is built, and deprecation warnings of their own dependencies. On a first run they bury the
commands' own lines (the tiny-model note, the summary, errors). :func:`quiet_third_party` turns them
off for the current process; ``--verbose`` (:func:`add_verbose_argument`) leaves them as they are.

The libraries are not imported here (importing diffusers takes seconds and ``--help`` should not):
a library already imported is quietened at once, one not yet imported right after its logging module
has been imported, by a ``sys.meta_path`` hook. Nothing is set in the environment, so subprocesses
(the sweep's threestudio runs) keep their own settings. Our own messages and progress bars, errors of
every library and huggingface_hub's download bars (a long wait deserves a bar) are not affected.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Sequence

__all__ = ["VERBOSE_HELP", "add_verbose_argument", "quiet_third_party", "wants_verbose"]

VERBOSE_HELP = (
    "show the warnings, info messages and loading bars of diffusers, transformers and "
    "accelerate (hidden by default so that this command's own messages stay readable)"
)

#: Warnings (message regex, category) that other packages raise at import or load time.
_KNOWN_WARNINGS = (
    # lightning_fabric (pinned stack) importing pkg_resources.
    (r"pkg_resources is deprecated", UserWarning),
    # huggingface_hub < 0.26 (pinned stack) called by diffusers 0.19 / transformers 4.28.
    (r"`resume_download` is deprecated", FutureWarning),
)
#: Loggers of the libraries whose records below ERROR are hidden.
_LOGGERS = ("accelerate",)


def add_verbose_argument(parser: argparse._ActionsContainer) -> None:
    """Add ``--verbose`` (store_true) to ``parser`` or an argument group."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def wants_verbose(argv: Sequence[str]) -> bool:
    """Whether ``--verbose`` is among ``argv`` (before a ``--`` separator)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--verbose":
            return True
    return False


def _quiet_transformers(logging_module: ModuleType) -> None:
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()


def _quiet_diffusers(logging_module: ModuleType) -> None:
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()


def _quiet_pipeline_utils(module: ModuleType) -> None:
    # diffusers 0.19 wraps its "Loading pipeline components..." loop in a plain tqdm that its
    # disable_progress_bar() does not reach (later releases use the logging module's tqdm). The
    # same name draws the denoising bar of a pipeline call, which stays: only that loop is hidden.
    bar = getattr(module, "tqdm", None)
    if bar is not None and not getattr(bar, "_perpneg_quiet", False):

        def silent_tqdm(*args: Any, **kwargs: Any) -> Any:
            if str(kwargs.get("desc", "")).startswith("Loading pipeline components"):
                kwargs["disable"] = True
            return bar(*args, **kwargs)

        silent_tqdm._perpneg_quiet = True  # type: ignore[attr-defined]
        module.tqdm = silent_tqdm  # type: ignore[attr-defined]


_HOOKS: Dict[str, Callable[[ModuleType], None]] = {
    "transformers.utils.logging": _quiet_transformers,
    "diffusers.utils.logging": _quiet_diffusers,
    "diffusers.pipelines.pipeline_utils": _quiet_pipeline_utils,
}


class _Loader(importlib.abc.Loader):
    """The real loader of a module, and a callback run once the module has been executed."""

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            self._callback(module)
        except Exception:  # a library that changed its API stays as loud as it was
            pass

    def __getattr__(self, name: str) -> Any:  # get_data, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the listed modules with the other finders and wraps their loaders in :class:`_Loader`."""

    def __init__(self) -> None:
        self.pending: Dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(
        self, fullname: str, path: Any = None, target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        callback = self.pending.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        del self.pending[fullname]
        spec.loader = _Loader(spec.loader, callback)
        return spec


_FINDER = _AfterImport()


def quiet_third_party(verbose: bool = False) -> None:
    """Hide third-party warnings, info messages and loading bars for this process.

    With ``verbose`` nothing changes. Idempotent; errors (logging level ERROR and above) and
    exceptions always come through.
    """
    if verbose:
        return
    for message, category in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, callback in _HOOKS.items():
        module = sys.modules.get(name)
        if module is not None:
            try:
                callback(module)
            except Exception:
                pass
        else:
            _FINDER.pending[name] = callback
    if _FINDER.pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
