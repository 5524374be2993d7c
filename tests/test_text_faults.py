"""Faults of the text-embedding cache (``threestudio_perpneg.core.text``) beyond corrupt files:
independent processes writing the same prompt at once, and a cache folder that cannot be written.

The processes are real (``multiprocessing`` spawn) and run our code unchanged; expected embeddings
come from the tiny checkpoint's CLIP text encoder called directly through transformers.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch
from torch import Tensor

from threestudio_perpneg.core.text import EmbeddingCache, text_embeddings

LOGGER = "threestudio_perpneg.core.text"
PROMPTS = ["a corgi", "", "a corgi, back view", "blurry", "a corgi, side view"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def direct(tiny_sd_path: Path) -> Dict[str, Tensor]:
    """Last hidden states of the tiny checkpoint's CLIP text encoder, computed here directly."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_path), subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(str(tiny_sd_path), subfolder="text_encoder").eval()
    ids = tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = encoder(input_ids=ids).last_hidden_state.float()
    return dict(zip(PROMPTS, hidden))


def _names(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _run_processes(target: Any, args_per_process: List[tuple]) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(args_per_process))
    procs = [ctx.Process(target=target, args=(*args, barrier)) for args in args_per_process]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)


# ------------------------------------------------------------------- two processes, one prompt set
def _encode_worker(model: str, cache: str, report: str, barrier: Any) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    loads: List[int] = []
    real = CLIPTextModel.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:  # counts encodes (transformers, not ours)
        loads.append(1)
        return real(*args, **kwargs)

    CLIPTextModel.from_pretrained = counting  # type: ignore[method-assign]
    barrier.wait()  # both processes look up the cache, find it empty and write the same files
    emb = text_embeddings(model, PROMPTS, cache)
    tensors = {str(i): emb[p].contiguous() for i, p in enumerate(PROMPTS)}
    save_file(tensors, report, metadata={"encoder_loads": str(len(loads))})


def _encoder_loads(report: str) -> int:
    from safetensors import safe_open

    with safe_open(report, framework="pt") as f:
        return int((f.metadata() or {})["encoder_loads"])


def test_two_processes_writing_the_same_prompts_both_get_them_and_leave_complete_files(
    tiny_sd_path: Path, tmp_path: Path, direct: Dict[str, Tensor]
) -> None:
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    reports = [str(tmp_path / f"report{i}.safetensors") for i in range(2)]
    _run_processes(_encode_worker, [(str(tiny_sd_path), str(cache), r) for r in reports])
    # Both processes found the cache empty, encoded and wrote every prompt: the writes overlapped.
    assert [_encoder_loads(r) for r in reports] == [1, 1]
    for report in reports:
        got = load_file(report)
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(got[str(i)], direct[p], rtol=1e-5, atol=1e-5)
    # One complete file per prompt, nothing else (no temporary files left by either writer).
    store = EmbeddingCache(cache)
    assert _names(cache) == sorted(store.path(str(tiny_sd_path), p).name for p in PROMPTS)
    for p in PROMPTS:
        hit = store.load(str(tiny_sd_path), p)
        assert hit is not None
        torch.testing.assert_close(hit, direct[p], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- a folder that is read-only
def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


class ReadOnlyFolder:
    """A folder made unwritable by ``protect()``: permission bits 0o555, or (as root, who ignores
    them) the immutable attribute; the test is skipped where neither works."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.undo: List[Any] = []

    def protect(self) -> None:
        folder = self.path
        if os.geteuid() != 0:
            folder.chmod(0o555)
            self.undo.append(lambda: folder.chmod(0o755))
        elif shutil.which("chattr"):
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
            if done.returncode == 0:
                self.undo.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
        if _writable(folder):
            pytest.skip("cannot make a read-only folder here (root without chattr +i)")


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[ReadOnlyFolder]:
    folder = ReadOnlyFolder(tmp_path / "cache")
    folder.path.mkdir()
    try:
        yield folder
    finally:
        for fn in folder.undo:
            fn()


def _warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def test_read_only_cache_folder_warns_once_and_keeps_embeddings_in_memory(
    tiny_sd_path: Path,
    read_only_folder: ReadOnlyFolder,
    direct: Dict[str, Tensor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, folder = str(tiny_sd_path), read_only_folder.path
    # One prompt was cached by an earlier run before the folder became read-only (a marked value,
    # to tell a read from a re-encode): it is read.
    marked = direct[PROMPTS[0]] + 1.0
    EmbeddingCache(folder).save(model, PROMPTS[0], marked)
    before = _names(folder)
    read_only_folder.protect()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        emb = text_embeddings(model, PROMPTS, folder)
    assert list(emb) == PROMPTS
    assert torch.equal(emb[PROMPTS[0]], marked)
    for p in PROMPTS[1:]:
        torch.testing.assert_close(emb[p], direct[p], rtol=1e-5, atol=1e-5)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    assert msg.startswith("cache_dir: ") and str(folder) in msg and "\n" not in msg
    assert f"keeping {len(PROMPTS) - 1} text embedding(s) in memory" in msg
    assert _names(folder) == before  # nothing written, no temporary file left


def test_cache_folder_path_through_a_file_warns_once_and_keeps_embeddings_in_memory(
    tiny_sd_path: Path, tmp_path: Path, direct: Dict[str, Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    """A cache_dir that cannot be created (a file is in the way): the same fallback, as root too."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    folder = blocker / "cache"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        emb = text_embeddings(str(tiny_sd_path), PROMPTS, folder)
    for p in PROMPTS:
        torch.testing.assert_close(emb[p], direct[p], rtol=1e-5, atol=1e-5)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(folder) in warnings[0] and "cache_dir" in warnings[0]
    assert _names(tmp_path) == ["not-a-folder"]


def _ddp_worker(rank: int, world: int, port: int, model: str, cache: str, report: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb = text_embeddings(model, PROMPTS, cache)
        tensors = {str(i): emb[p].contiguous() for i, p in enumerate(PROMPTS)}
        save_file(tensors, f"{report}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_ranks_get_the_embeddings_when_rank_0_cannot_write(
    tiny_sd_path: Path, tmp_path: Path, direct: Dict[str, Tensor]
) -> None:
    """Rank 0 cannot write the cache: it keeps its embeddings in memory, and the other rank, which
    finds nothing to read, encodes them itself instead of failing."""
    import socket

    import torch.multiprocessing as tmp_mp
    from safetensors.torch import load_file

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = str(tmp_path / "report")
    tmp_mp.start_processes(
        _ddp_worker,
        args=(2, port, str(tiny_sd_path), str(blocker / "cache"), report),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    for rank in range(2):
        got = load_file(f"{report}.{rank}")
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(got[str(i)], direct[p], rtol=1e-5, atol=1e-5)
