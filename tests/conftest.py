"""Shared fixtures: a tiny seeded Stable Diffusion checkpoint built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion folder (unet/vae/text_encoder/tokenizer/scheduler)."""
    from threestudio_perpneg.tiny.builders import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Run a module of tiny-tensor tests single-threaded: on a busy 2-core runner every intra-op
    parallel region (e.g. index_add) can wait ~0.1 s for a descheduled OpenMP worker."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_TIER_NODEIDS: set = set()


def pytest_collection_modifyitems(config, items) -> None:
    _TIER_NODEIDS.update(item.nodeid for item in items if item.get_closest_marker("threestudio"))


def _in_tier(report) -> bool:
    if report.nodeid in _TIER_NODEIDS:
        return True
    # Module-level skips are collection reports of a whole test_threestudio_* file (no items).
    path = report.nodeid.split("::")[0]
    return "::" not in report.nodeid and os.path.basename(path).startswith("test_threestudio_")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line `.ci/run` checks: how many threestudio-tier tests passed, failed, were skipped."""
    counts = {
        outcome: sum(
            1
            for r in terminalreporter.stats.get(outcome, [])
            if _in_tier(r) and (outcome != "passed" or r.when == "call")
        )
        for outcome in ("passed", "failed", "error", "skipped")
    }
    terminalreporter.write_line(
        "threestudio tier: {passed} passed, {failed} failed, {error} errors, "
        "{skipped} skipped".format(**counts)
    )
