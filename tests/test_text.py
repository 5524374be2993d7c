"""Tests of the text side (``threestudio_perpneg.core.text``): view prompts, checkpoint resolution, the
safetensors embedding cache and :func:`text_embeddings` on the tiny random checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import torch
from torch import Tensor

import threestudio_perpneg.core.text as text_mod
from threestudio_perpneg.core.text import (
    DEFAULT_TEMPLATES,
    FRONT_TEMPLATES,
    EmbeddingCache,
    encode_prompts,
    resolve_pretrained,
    text_embeddings,
    view_prompts,
)
from threestudio_perpneg.core.views import VIEW_NAMES

LOGGER = "threestudio_perpneg.core.text"
MODEL = "some/model"
PROMPTS = ["a corgi", "", "a corgi, front view", "blurry"]


# ------------------------------------------------------------------------------------ view prompts
def test_view_prompts_default_order_and_templates() -> None:
    assert VIEW_NAMES == ("side", "front", "back", "overhead")
    assert view_prompts("a corgi") == [
        "a corgi, side view",
        "a corgi, front view",
        "a corgi, back view",
        "a corgi, overhead view",
    ]
    assert view_prompts("a corgi", DEFAULT_TEMPLATES) == view_prompts("a corgi")
    assert view_prompts("a corgi", FRONT_TEMPLATES) == [
        "side view of a corgi",
        "front view of a corgi",
        "backside view of a corgi",
        "overhead view of a corgi",
    ]


def test_view_prompts_partial_templates_fall_back_to_defaults() -> None:
    assert view_prompts("a cat", {"back": "the back of {prompt}"}) == [
        "a cat, side view",
        "a cat, front view",
        "the back of a cat",
        "a cat, overhead view",
    ]


def test_view_prompts_overrides() -> None:
    out = view_prompts("a cat", overrides={"front": "a cat's face", "back": "", "side": None})
    assert out == ["a cat, side view", "a cat's face", "a cat, back view", "a cat, overhead view"]
    # An override wins over a template, and the override is used verbatim.
    out = view_prompts("a cat", FRONT_TEMPLATES, overrides={"overhead": "top-down {prompt} photo"})
    assert out[3] == "top-down {prompt} photo"
    assert out[:3] == view_prompts("a cat", FRONT_TEMPLATES)[:3]


def test_view_prompts_keep_braces_in_the_prompt() -> None:
    # Templates are filled by substitution, not str.format: braces in the prompt are literal.
    assert view_prompts("a {weird} corgi")[1] == "a {weird} corgi, front view"
    assert view_prompts("x", {"front": "{prompt} {other}"})[1] == "x {other}"


@pytest.mark.parametrize("prompt", ["", "   ", None, 3])
def test_view_prompts_reject_empty_prompt(prompt: Any) -> None:
    with pytest.raises(ValueError, match="^prompt: ") as info:
        view_prompts(prompt)
    assert repr(prompt) in str(info.value)


@pytest.mark.parametrize("template", ["front view", "{Prompt} front", "", 7])
def test_view_prompts_reject_template_without_placeholder(template: Any) -> None:
    with pytest.raises(ValueError, match=r"view_templates\.front") as info:
        view_prompts("a corgi", {"front": template})
    assert "{prompt}" in str(info.value) and repr(template) in str(info.value)


def test_view_prompts_reject_unknown_view_key() -> None:
    with pytest.raises(ValueError, match="view_templates") as info:
        view_prompts("a corgi", {"left": "{prompt}, left view", "front": "{prompt}"})
    assert "left" in str(info.value)
    assert "front" in str(info.value)  # the message lists the expected keys


# ------------------------------------------------------------------------------ resolve_pretrained
def test_resolve_pretrained_existing_folder_and_hub_id(tmp_path: Path) -> None:
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    assert resolve_pretrained("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert resolve_pretrained("stable-diffusion") == "stable-diffusion"


def test_resolve_pretrained_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "sd").mkdir(parents=True)
    assert resolve_pretrained("~/models/sd") == str(tmp_path / "models" / "sd")
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path"):
        resolve_pretrained("~/models/missing")


@pytest.mark.parametrize(
    "path", ["/nonexistent/model", "./nope/model", "../nope", "a/b/c", "~/no-such-dir-xyz"]
)
def test_resolve_pretrained_missing_local_path(path: str) -> None:
    with pytest.raises(FileNotFoundError, match="^pretrained_model_name_or_path: ") as info:
        resolve_pretrained(path)
    assert repr(path) in str(info.value)


def test_resolve_pretrained_file_instead_of_folder(tmp_path: Path) -> None:
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"not a folder")
    with pytest.raises(FileNotFoundError, match="^pretrained_model_name_or_path: ") as info:
        resolve_pretrained(str(f))
    assert "is a file" in str(info.value) and repr(str(f)) in str(info.value)


@pytest.mark.parametrize("value", ["", "  ", None])
def test_resolve_pretrained_empty(value: Any) -> None:
    with pytest.raises(ValueError, match="^pretrained_model_name_or_path: "):
        resolve_pretrained(value)


def test_resolve_pretrained_custom_key() -> None:
    with pytest.raises(FileNotFoundError, match="^cache_model: "):
        resolve_pretrained("/nonexistent/model", key="cache_model")
    with pytest.raises(ValueError, match="^cache_model: "):
        resolve_pretrained("", key="cache_model")


# ------------------------------------------------------------------------------- EmbeddingCache
def embedding(seed: int = 0) -> Tensor:
    return torch.randn(77, 32, generator=torch.Generator().manual_seed(seed))


def files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cache_miss_returns_none(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "not-created-yet")
    assert cache.load(MODEL, "a corgi") is None
    assert not (tmp_path / "not-created-yet").exists()


def test_cache_roundtrip_and_file_format(tmp_path: Path) -> None:
    from safetensors import safe_open

    cache = EmbeddingCache(tmp_path / "cache")
    emb = embedding()
    path = cache.save(MODEL, "a corgi", emb)
    assert path == cache.path(MODEL, "a corgi")
    assert path.suffix == ".safetensors" and path.parent == tmp_path / "cache"

    hit = cache.load(MODEL, "a corgi")
    assert hit is not None and hit.dtype == torch.float32
    assert torch.equal(hit, emb)
    assert cache.load(MODEL, "a corgi, front view") is None
    assert cache.load("other/model", "a corgi") is None

    # A plain safetensors file, readable without unpickling, keyed by its metadata.
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["embedding"]
        assert torch.equal(f.get_tensor("embedding"), emb)
    assert meta["model"] == MODEL and meta["prompt"] == "a corgi" and meta["namespace"] == "clip"


def test_cache_save_casts_to_float32_cpu(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    emb = embedding().half()
    cache.save(MODEL, "p", emb)
    hit = cache.load(MODEL, "p")
    assert hit is not None and hit.dtype == torch.float32
    assert torch.equal(hit, emb.float())


def test_cache_paths_are_distinct_per_key(tmp_path: Path) -> None:
    clip = EmbeddingCache(tmp_path)
    other = EmbeddingCache(tmp_path, namespace="t5")
    paths = {
        clip.path(MODEL, "a"),
        clip.path(MODEL, "b"),
        clip.path("other/model", "a"),
        other.path(MODEL, "a"),
    }
    assert len(paths) == 4
    assert clip.path(MODEL, "a") == EmbeddingCache(tmp_path).path(MODEL, "a")
    clip.save(MODEL, "a", embedding(1))
    other.save(MODEL, "a", embedding(2))
    a, b = clip.load(MODEL, "a"), other.load(MODEL, "a")
    assert a is not None and b is not None and not torch.equal(a, b)


def _truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_last_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(512))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _header_only(path: Path) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[: 8 + n])


def _pickle(path: Path) -> None:
    torch.save({"embedding": embedding()}, str(path))  # a torch pickle is never trusted


def _other_key_name(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weights": embedding()}, str(path), metadata={"model": MODEL, "prompt": "a corgi"})


def _no_metadata(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"embedding": embedding()}, str(path))


CORRUPTIONS = {
    "truncated": _truncate_half,
    "partial": _drop_last_byte,
    "header-only": _header_only,
    "garbage": _garbage,
    "empty": _empty,
    "pickle": _pickle,
    "other-tensor-name": _other_key_name,
    "no-metadata": _no_metadata,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_cache_corrupt_file_is_a_miss_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    cache = EmbeddingCache(tmp_path)
    path = cache.save(MODEL, "a corgi", embedding())
    CORRUPTIONS[kind](path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(MODEL, "a corgi") is None
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()


@pytest.mark.parametrize("other", [("other/model", "a corgi"), (MODEL, "a cat")])
def test_cache_file_for_another_key_is_a_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, other: Sequence[str]
) -> None:
    cache = EmbeddingCache(tmp_path)
    wrong = cache.save(other[0], other[1], embedding(3))
    target = cache.path(MODEL, "a corgi")
    os.replace(wrong, target)  # e.g. a hash collision or a file copied by hand
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.load(MODEL, "a corgi") is None
    assert any(
        r.levelno == logging.WARNING and "metadata" in r.getMessage() for r in caplog.records
    )


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    cache = EmbeddingCache(tmp_path)
    first = embedding(1)
    path = cache.save(MODEL, "a corgi", first)
    cache.save(MODEL, "a corgi", embedding(2))  # overwrite in place
    cache.save(MODEL, "a cat", embedding(3))
    assert files(tmp_path) == sorted([path.name, cache.path(MODEL, "a cat").name])

    # A writer that dies half way: the old file stays intact and no temporary file is left behind.
    real_save = safetensors.torch.save_file

    def dying_save(tensors: Dict[str, Tensor], filename: str, metadata: Any = None) -> None:
        real_save(tensors, filename, metadata=metadata)
        _truncate_half(Path(filename))
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        cache.save(MODEL, "a corgi", embedding(4))
    monkeypatch.undo()
    hit = cache.load(MODEL, "a corgi")
    assert hit is not None and torch.equal(hit, embedding(2))
    assert files(tmp_path) == sorted([path.name, cache.path(MODEL, "a cat").name])
    assert not [n for n in files(tmp_path) if n.endswith(".tmp") or n.startswith(".")]


# ------------------------------------------------------------------------------ text_embeddings
@pytest.fixture(scope="module")
def direct(tiny_sd_path: Path) -> Dict[str, Tensor]:
    """Last hidden states of the tiny checkpoint's CLIP text encoder, computed here directly."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_path), subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(str(tiny_sd_path), subfolder="text_encoder").eval()
    ids = tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (len(PROMPTS), 77)
    with torch.no_grad():
        hidden = encoder(input_ids=ids).last_hidden_state.float()
    return dict(zip(PROMPTS, hidden))


class EncoderLoads:
    """Counts loads of the CLIP text encoder, or forbids them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from transformers import CLIPTextModel

        self.count = 0
        self.forbidden = False
        real = CLIPTextModel.from_pretrained  # bound classmethod

        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            if self.forbidden:
                raise AssertionError("the text encoder was loaded although every prompt is cached")
            self.count += 1
            return real(*args[1:] if args and args[0] is CLIPTextModel else args, **kwargs)

        monkeypatch.setattr(CLIPTextModel, "from_pretrained", from_pretrained)


def test_text_embeddings_equal_the_encoder(tiny_sd_path: Path, direct: Dict[str, Tensor]) -> None:
    out = text_embeddings(str(tiny_sd_path), PROMPTS, None)
    assert list(out) == PROMPTS
    for p in PROMPTS:
        assert out[p].shape == (77, 32) and out[p].dtype == torch.float32
        torch.testing.assert_close(out[p], direct[p], rtol=1e-5, atol=1e-5)
    # The tiny tokenizer distinguishes the prompts.
    assert not torch.allclose(out["a corgi"], out["a corgi, front view"])
    # encode_prompts batches: any batch size gives the same embeddings.
    stacked = encode_prompts(str(tiny_sd_path), PROMPTS, batch_size=3)
    torch.testing.assert_close(stacked, torch.stack([direct[p] for p in PROMPTS]), **_tol())


def _tol() -> Dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5}


def test_text_embeddings_cache_files_and_second_call(
    tiny_sd_path: Path, tmp_path: Path, direct: Dict[str, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open

    model = str(tiny_sd_path)
    cache_dir = tmp_path / "cache"
    loads = EncoderLoads(monkeypatch)
    prompts = [*PROMPTS, "a corgi", "blurry"]  # duplicates are encoded and stored once
    first = text_embeddings(model, prompts, cache_dir)
    assert loads.count == 1
    assert list(first) == PROMPTS
    cache = EmbeddingCache(cache_dir)
    assert files(cache_dir) == sorted(cache.path(model, p).name for p in PROMPTS)
    for p in PROMPTS:
        torch.testing.assert_close(first[p], direct[p], **_tol())
        with safe_open(str(cache.path(model, p)), framework="pt", device="cpu") as f:
            assert f.metadata()["prompt"] == p and f.metadata()["model"] == model
            assert torch.equal(f.get_tensor("embedding"), first[p])

    loads.forbidden = True
    second = text_embeddings(model, list(reversed(prompts)), cache_dir)
    assert set(second) == set(PROMPTS)
    for p in PROMPTS:
        assert torch.equal(second[p], first[p])
    assert len(files(cache_dir)) == len(PROMPTS)


def test_text_embeddings_recompute_bad_cache_files(
    tiny_sd_path: Path,
    tmp_path: Path,
    direct: Dict[str, Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = str(tiny_sd_path)
    cache = EmbeddingCache(tmp_path)
    text_embeddings(model, PROMPTS, tmp_path)
    _garbage(cache.path(model, "a corgi"))
    _truncate_half(cache.path(model, "blurry"))
    # A valid file that names another prompt, under the path of "a corgi, front view".
    os.replace(
        cache.save(model, "elsewhere", embedding(5)), cache.path(model, "a corgi, front view")
    )

    encoded: List[List[str]] = []
    real = text_mod.encode_prompts

    def spy(pretrained: str, prompts: Sequence[str], *args: Any, **kwargs: Any) -> Tensor:
        encoded.append(list(prompts))
        return real(pretrained, prompts, *args, **kwargs)

    monkeypatch.setattr(text_mod, "encode_prompts", spy)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = text_embeddings(model, PROMPTS, tmp_path)
    assert encoded == [["a corgi", "a corgi, front view", "blurry"]]  # only the bad ones
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3
    for p in PROMPTS:
        torch.testing.assert_close(out[p], direct[p], **_tol())
        hit = cache.load(model, p)  # rewritten and valid again
        assert hit is not None and torch.equal(hit, out[p])
    assert len(files(tmp_path)) == len(PROMPTS)


def test_text_embeddings_without_cache_never_write(
    tiny_sd_path: Path, tmp_path: Path, direct: Dict[str, Tensor]
) -> None:
    cache_dir = tmp_path / "cache"
    out = text_embeddings(str(tiny_sd_path), PROMPTS, cache_dir, use_cache=False)
    assert not cache_dir.exists()
    assert files(tmp_path) == []
    for p in PROMPTS:
        torch.testing.assert_close(out[p], direct[p], **_tol())
    out = text_embeddings(str(tiny_sd_path), PROMPTS, None)
    assert files(tmp_path) == []


def test_text_embeddings_missing_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path"):
        text_embeddings("/nonexistent/model", ["a corgi"], tmp_path)
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        text_embeddings("", ["a corgi"], None)
    assert files(tmp_path) == []
