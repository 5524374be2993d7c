"""The testbed prior: tokenizer, view-word separation, training plumbing, the shipped checkpoint.

Loading is checked with the real ``from_pretrained`` classes and our pixel engine; the registered
threestudio guidance + prompt processor run on the shipped prior in the threestudio tier.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from threestudio_support.fixtures import threestudio_module, threestudio_workdir  # noqa: F401

from threestudio_perpneg.core.text import encode_prompts, view_prompts
from threestudio_perpneg.testbed.prior import (
    VIEW_WORDS,
    PriorConfig,
    apply_view_word_separation,
    build_models,
    build_vocab,
    freeze_view_rows,
    load_prior_path,
    prompt_words,
    view_token_ids,
    word_merges,
    write_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

WORDS = ["a", "cartoon", "troll", "robot", "head", "overhead", "backside", "back", "side", "view"]


def _tokenizer(folder: Path, words):
    from transformers import CLIPTokenizer

    merges = word_merges(words)
    vocab = build_vocab(merges)
    write_tokenizer(folder / "tok", vocab, merges, 32)
    return CLIPTokenizer.from_pretrained(str(folder / "tok")), vocab


def test_every_word_is_one_token_through_the_real_tokenizer(tmp_path):
    words = list(dict.fromkeys(WORDS + prompt_words()))
    tok, vocab = _tokenizer(tmp_path, words)
    for word in words:
        assert tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids) == [
            f"{word}</w>"
        ], word
    # threestudio's suffixes and the prefix templates are whole words + the comma.
    for prompt in view_prompts("a cartoon troll head"):
        pieces = tok.convert_ids_to_tokens(tok(prompt, add_special_tokens=False).input_ids)
        assert all(p.endswith("</w>") for p in pieces), pieces
    assert set(VIEW_WORDS) <= set(prompt_words())
    assert tok.model_max_length == 32 and len(tok) == len(vocab)


def test_word_merges_rejects_bad_words():
    with pytest.raises(ValueError, match="words: .*'Back'"):
        word_merges(["Back"])


@pytest.mark.parametrize("separation", [0.0, 0.25, 1.0, 3.0])
def test_view_word_separation_scales_pairwise_distances(tmp_path, separation):
    tok, vocab = _tokenizer(tmp_path, WORDS + prompt_words())
    _, text_encoder, _ = build_models(PriorConfig(), vocab, seed=3)
    ids = view_token_ids(tok)
    assert len(ids) == len(VIEW_WORDS) == len(set(ids))
    weight = text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    apply_view_word_separation(text_encoder, ids, separation)
    after = weight.detach()
    for i, j in itertools.combinations(ids, 2):
        d0 = (before[i] - before[j]).norm()
        assert float((after[i] - after[j]).norm()) == pytest.approx(
            float(separation * d0), abs=1e-5
        )
    others = [k for k in range(len(vocab)) if k not in ids]
    assert torch.equal(after[others], before[others])


def test_frozen_view_rows_do_not_move_under_training(tmp_path):
    tok, vocab = _tokenizer(tmp_path, WORDS + prompt_words())
    _, text_encoder, _ = build_models(PriorConfig(), vocab, seed=0)
    ids = view_token_ids(tok)
    hook = freeze_view_rows(text_encoder, ids)
    weight = text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    opt = torch.optim.AdamW(text_encoder.parameters(), lr=1e-2, weight_decay=0.0)
    tokens = tok(
        ["a back view", "a side view of a troll head"], padding="max_length", return_tensors="pt"
    )
    for _ in range(3):
        opt.zero_grad()
        text_encoder(tokens.input_ids)[0].pow(2).mean().backward()
        opt.step()
    hook.remove()
    assert torch.equal(weight.detach()[ids], before[ids])
    used = tok("troll head", add_special_tokens=False).input_ids
    assert not torch.equal(weight.detach()[used], before[used])


def test_configs_are_strict():
    with pytest.raises(ValueError, match="prior.width"):
        PriorConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="resolution: 18 px is not divisible by 4"):
        PriorConfig(resolution=18)
    from threestudio_perpneg.testbed.train import TrainConfig

    with pytest.raises(ValueError, match="train.epochs"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match="cfg_dropout"):
        TrainConfig(cfg_dropout=1.5)
    assert TrainConfig.from_dict(TrainConfig(steps=7).to_dict()) == TrainConfig(steps=7)
    with pytest.raises(ValueError, match="freeze_view_words: expected true or false, got 'yes'"):
        TrainConfig(freeze_view_words="yes")  # type: ignore[arg-type]


def test_unfrozen_view_rows_start_at_the_separation_and_then_learn(tmp_path):
    """The default recipe trains the view-word rows: they leave their scaled initial values."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from threestudio_perpneg.testbed.train import TrainConfig, shipped_dataset_config, train_prior

    dataset = shipped_dataset_config(view_word_separation=0.3)
    prior = PriorConfig(block_out_channels=(16, 32), text_hidden_size=32, text_layers=1)
    # No weight average (decay 0 from the first step): the saved weights are the trained ones.
    recipe = TrainConfig(
        steps=3, batch_size=8, pool_size=16, warmup_steps=0, threads=1, ema_decay=0.0
    )
    assert recipe.freeze_view_words is False
    train_prior(tmp_path / "p", dataset, prior, recipe, progress=False)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "p", subfolder="tokenizer")
    ids = view_token_ids(tok)
    _, fresh, _ = build_models(prior, tok.get_vocab(), recipe.seed)
    apply_view_word_separation(fresh, ids, 0.3)
    w0 = fresh.get_input_embeddings().weight.detach()[ids]
    w1 = CLIPTextModel.from_pretrained(tmp_path / "p", subfolder="text_encoder")
    w1 = w1.get_input_embeddings().weight.detach()[ids]
    # Adam moves every row with a gradient by about lr per step: far more than float rounding.
    assert (w1 - w0).abs().max() > 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of the real training loop on a tiny architecture (plumbing, not quality)."""
    from threestudio_perpneg.testbed.train import TrainConfig, shipped_dataset_config, train_prior

    out = tmp_path_factory.mktemp("prior") / "p"
    dataset = shipped_dataset_config(view_word_separation=0.3)
    prior = PriorConfig(block_out_channels=(16, 32), text_hidden_size=32, text_layers=1)
    recipe = TrainConfig(
        steps=2,
        batch_size=4,
        pool_size=16,
        warmup_steps=1,
        log_every=1,
        threads=1,
        freeze_view_words=True,
    )
    metrics = train_prior(out, dataset, prior, recipe, progress=False)
    return out, dataset, prior, recipe, metrics


def test_training_writes_a_loadable_diffusers_folder(trained):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from threestudio_perpneg.testbed.dataset import DatasetConfig

    out, dataset, prior, recipe, metrics = trained
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (
        3,
        3,
        16,
    )
    assert (
        DDPMScheduler.from_pretrained(out, subfolder="scheduler").config.variance_type
        == "fixed_small"
    )
    tok = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    saved = json.loads((out / "testbed.json").read_text())
    assert DatasetConfig.from_dict(saved["dataset"]) == dataset
    assert PriorConfig.from_dict(saved["prior"]) == prior
    assert saved["train"] == {**recipe.to_dict(), "init_from": None}
    assert json.loads((out / "metrics.json").read_text())["loss_steps"] == [1, 2]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".p.tmp-*"))  # atomic: no temporary folder left

    # The separation survived training and saving: a fresh init with the same seed, scaled by 0.3.
    ids = view_token_ids(tok)
    _, fresh, _ = build_models(prior, tok.get_vocab(), recipe.seed)
    w0 = fresh.get_input_embeddings().weight.detach()
    w1 = text_encoder.get_input_embeddings().weight.detach()
    for i, j in itertools.combinations(ids, 2):
        assert float((w1[i] - w1[j]).norm()) == pytest.approx(
            0.3 * float((w0[i] - w0[j]).norm()), rel=1e-4
        )
    emb = encode_prompts(str(out), ["a cartoon troll head, back view", ""])
    assert emb.shape == (2, 32, 32) and not torch.allclose(emb[0], emb[1])


def test_training_continues_from_a_prior_folder(trained, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    from threestudio_perpneg.testbed.train import TrainConfig, shipped_dataset_config, train_prior

    out, dataset, prior, recipe, _ = trained
    more = TrainConfig(
        steps=1,
        batch_size=4,
        pool_size=16,
        warmup_steps=0,
        threads=1,
        seed=5,
        freeze_view_words=True,
    )
    train_prior(tmp_path / "c", dataset, prior, more, progress=False, init_from=out)
    saved = json.loads((tmp_path / "c" / "testbed.json").read_text())
    assert saved["train"]["init_from"] == {**recipe.to_dict(), "init_from": None}
    ids = view_token_ids(CLIPTokenizer.from_pretrained(out, subfolder="tokenizer"))
    w0 = CLIPTextModel.from_pretrained(out, subfolder="text_encoder").get_input_embeddings().weight
    w1 = CLIPTextModel.from_pretrained(tmp_path / "c", subfolder="text_encoder")
    # Separation kept (up to the rounding of the weight average of a constant row).
    torch.testing.assert_close(w1.get_input_embeddings().weight[ids], w0[ids], rtol=1e-6, atol=1e-7)
    other = shipped_dataset_config(view_word_separation=0.9)
    with pytest.raises(ValueError, match="init_from: .* another dataset config"):
        train_prior(tmp_path / "d", other, prior, more, progress=False, init_from=out)


def test_training_refuses_a_non_empty_folder(trained):
    from threestudio_perpneg.testbed.train import train_prior

    out = trained[0]
    with pytest.raises(FileExistsError, match="not empty"):
        train_prior(out, progress=False)


def test_cli_errors_exit_2_naming_the_argument(tmp_path, capsys):
    from threestudio_perpneg.__main__ import main

    bad = tmp_path / "knobs.json"
    bad.write_text(json.dumps({"view_frequncies": {}}))
    assert (
        main(["testbed", "train", "--out", str(tmp_path / "o"), "--dataset-config", str(bad)]) == 2
    )
    assert "view_frequncies" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["testbed", "bias", "--out", str(tmp_path), "--n", "0"])
    assert info.value.code == 2 and "--n" in capsys.readouterr().err


# ------------------------------------------------------------------------ the shipped checkpoint
def _shipped() -> Path:
    return Path(load_prior_path())


def test_shipped_prior_loads_through_the_real_classes():
    from diffusers import UNet2DConditionModel

    from threestudio_perpneg.engines.pixel import PerpNegIFEngine, load_deepfloyd_if
    from threestudio_perpneg.testbed.dataset import DatasetConfig

    path = _shipped()
    meta = json.loads((path / "testbed.json").read_text())
    data = DatasetConfig.from_dict(meta["dataset"])
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    assert (unet.config.out_channels, unet.config.sample_size) == (3, data.resolution)
    unet, scheduler = load_deepfloyd_if(str(path))
    engine = PerpNegIFEngine(unet, scheduler)
    assert engine.resolution == data.resolution
    emb = encode_prompts(str(path), view_prompts(data.base_prompt(data.identities[0])))
    assert emb.shape[:2] == (4, PriorConfig.from_dict(meta["prior"]).max_length)
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["final_loss"] < metrics["loss"][0]  # it was trained, not just initialised
    assert (path / "loss.png").is_file()
    weights = list(path.glob("*/*.safetensors"))
    assert len(weights) == 2 and sum(w.stat().st_size for w in weights) < 20e6
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))


@pytest.mark.threestudio
def test_shipped_prior_through_the_registered_threestudio_classes(
    threestudio_module,  # noqa: F811
    threestudio_workdir,  # noqa: F811
):
    """``perpneg-prompt-processor`` (CLIP) + ``perpneg-deep-floyd-guidance`` on the shipped prior."""
    from threestudio_perpneg.testbed.dataset import DatasetConfig
    from threestudio_perpneg.threestudio_cpu.system import load_custom_extension

    load_custom_extension(Path(__file__).resolve().parents[1] / "custom" / "threestudio-perpneg")
    path = str(_shipped())
    data = DatasetConfig.from_dict(json.loads((_shipped() / "testbed.json").read_text())["dataset"])
    prompt = data.base_prompt(data.identities[0])
    processor = threestudio_module.find("perpneg-prompt-processor")(
        {
            "pretrained_model_name_or_path": path,
            "prompt": prompt,
            "spawn": False,
            "cache_dir": "c",
            "perp_neg_scheme": "authors",
        }
    )
    utils = processor()
    expected = encode_prompts(path, view_prompts(prompt))  # side, front, back, overhead
    torch.testing.assert_close(utils.perp_neg_bank.views, expected, rtol=1e-5, atol=1e-5)

    guidance = threestudio_module.find("perpneg-deep-floyd-guidance")(
        {"pretrained_model_name_or_path": path, "half_precision_weights": False}
    )
    seen = []
    hook = guidance.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    az = torch.tensor([0.0, 180.0])
    el, dist = torch.zeros(2), torch.full((2,), 3.0)
    rgb = torch.rand(2, 64, 64, 3, requires_grad=True)
    try:
        out = guidance(rgb, utils, el, az, dist, rgb_as_latents=False)
    finally:
        hook.remove()
    out["loss_sds"].backward()
    # One batched call at the prior's native resolution: 2 branches per sample + the negatives.
    assert len(seen) == 1 and tuple(seen[0][1:]) == (3, data.resolution, data.resolution)
    assert seen[0][0] == out["perp_neg_branches"] > 4
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_bias_command_appends_calibration_attempts(trained, tmp_path, capsys):
    """``testbed bias --calibration-log`` appends one attempt per run (knobs, recipe, rates),
    and refuses a log that is not an attempts file instead of overwriting it."""
    from threestudio_perpneg.__main__ import main

    prior, dataset, _, recipe, _ = trained
    log = tmp_path / "calibration.json"
    argv = ["testbed", "bias", "--prior", str(prior), "--n", "3", "--steps", "2", "--quiet"]
    for k, note in enumerate(["first", "second"]):
        out = tmp_path / f"bias{k}"
        assert main([*argv, "--out", str(out), "--calibration-log", str(log), "--note", note]) == 0
    printed = capsys.readouterr().out
    assert printed.count("front_fraction_noview") == 2 and "views {" in printed
    attempts = json.loads(log.read_text())["attempts"]
    assert [a["note"] for a in attempts] == ["first", "second"]
    report = json.loads((tmp_path / "bias1" / "prior_bias.json").read_text())
    for a in attempts:
        assert a["dataset"] == dataset.to_dict() and a["train"]["steps"] == recipe.steps
        assert a["steps"] == 2 and len(a["cells"]) == 3
        for cell in a["cells"]:
            assert 0 <= cell["successes"] <= cell["n"] == 3
    assert attempts[1]["front_fraction_noview"] == report["front_fraction_noview"]

    log.write_text(json.dumps({"something": 1}))
    assert main([*argv, "--out", str(tmp_path / "b2"), "--calibration-log", str(log)]) == 2
    assert "--calibration-log" in capsys.readouterr().err
    assert json.loads(log.read_text()) == {"something": 1}


def test_default_recipe_and_knobs_are_the_shipped_priors():
    """``testbed train --out DIR`` with no options retrains the shipped prior's recipe and data."""
    from threestudio_perpneg.testbed.train import TrainConfig, shipped_dataset_config

    saved = json.loads((_shipped() / "testbed.json").read_text())
    train = {k: v for k, v in saved["train"].items() if k != "init_from"}
    assert saved["train"]["init_from"] is None  # trained from scratch, not continued
    assert TrainConfig.from_dict(train) == TrainConfig()
    assert saved["dataset"] == shipped_dataset_config().to_dict()
    assert saved["prior"] == PriorConfig().to_dict()
