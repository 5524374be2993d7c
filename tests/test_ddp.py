"""DDP behaviour of the text-embedding cache: rank 0 encodes, the other ranks wait and read."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model: str, cache: str, report: str) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers

        from threestudio_perpneg.core.text import text_embeddings

        loads = []
        original = transformers.CLIPTextModel.from_pretrained

        def counting(*args, **kwargs):
            loads.append(rank)
            return original(*args, **kwargs)

        transformers.CLIPTextModel.from_pretrained = counting  # type: ignore[method-assign]
        emb = text_embeddings(model, ["a corgi", "a corgi, back view", ""], cache)
        with open(f"{report}.{rank}", "w") as f:
            json.dump(
                {
                    "loads": len(loads),
                    "sums": {k: float(v.double().sum()) for k, v in emb.items()},
                },
                f,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_rank0_encodes_once_and_all_ranks_read_the_same(tiny_sd_path: Path, tmp_path: Path):
    world = 2
    cache = tmp_path / "cache"
    report = str(tmp_path / "report")
    mp.start_processes(
        _worker,
        args=(world, _free_port(), str(tiny_sd_path), str(cache), report),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    results = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(world)]
    assert results[0]["loads"] == 1, "rank 0 must encode the missing prompts"
    assert all(r["loads"] == 0 for r in results[1:]), "other ranks must only read the cache"
    assert all(r["sums"] == results[0]["sums"] for r in results[1:])
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and all(name.endswith(".safetensors") for name in files)
    # Values are those of a direct encode in this process.
    from threestudio_perpneg.core.text import encode_prompts

    direct = encode_prompts(str(tiny_sd_path), ["a corgi"])[0]
    assert results[0]["sums"]["a corgi"] == pytest.approx(float(direct.double().sum()), rel=1e-6)
    assert torch.isfinite(direct).all()
