"""Testbed 3D protocol: cameras, ring scoring, and SDS texture optimisation plumbing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from threestudio_perpneg.testbed import protocol3d as P3

pytest.importorskip("diffusers")


def test_ring_avoids_bucket_boundaries_and_starts_at_the_front() -> None:
    az = P3.ring_azimuths(12)
    assert az[0] == 0.0 and 180.0 in az and len(set(az)) == 12
    assert all(-180.0 < a <= 180.0 for a in az)
    assert min(min(abs(abs(a) - 45.0), abs(abs(a) - 135.0)) for a in az) == pytest.approx(15.0)


def test_cameras_follow_threestudio_sampling() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        el, az, dist, fovy = P3.sample_cameras(
            4,
            g,
            elevation_range_deg=(-10.0, 45.0),
            camera_distance_range=(2.5, 3.5),
            fovy_range_deg=(40.0, 50.0),
        )
        # batch_uniform_azimuth: sample k lies in the k-th quarter of (-180, 180).
        for k in range(4):
            assert -180.0 + 90.0 * k <= float(az[k]) <= -180.0 + 90.0 * (k + 1)
        assert bool(((el >= -10.0) & (el <= 45.0)).all())
        assert bool(((dist >= 2.5) & (dist <= 3.5)).all()) and bool(
            ((fovy >= 40) & (fovy <= 50)).all()
        )


def _ring(labels_by_azimuth):
    az = P3.ring_azimuths(12)
    return az, [labels_by_azimuth(a) for a in az]


def _truth(a: float) -> str:
    return "front" if abs(a) < 45 else "back" if abs(a) > 135 else "side"


def test_score_ring_on_hand_built_rings() -> None:
    az, labels = _ring(_truth)
    janus, kept, acc, truth, _ = P3.score_ring(az, labels)
    assert (janus, kept) == (False, True) and acc == {"front": 1.0, "side": 1.0, "back": 1.0}
    assert truth == labels
    # A face on the back of the head: front at the back cameras.
    az, labels = _ring(lambda a: "front" if abs(a) < 45 or abs(a) > 135 else "side")
    janus, kept, acc, _, _ = P3.score_ring(az, labels)
    assert (janus, kept) == (True, True) and acc["back"] == 0.0
    # The front was erased (seen as a back) and no face anywhere.
    az, labels = _ring(lambda a: "back" if abs(a) < 45 or abs(a) > 135 else "side")
    janus, kept, acc, _, _ = P3.score_ring(az, labels)
    assert (janus, kept) == (False, False) and acc["front"] == 0.0 and acc["back"] == 1.0
    # "none" (no head view) is not a front and a miss for the accuracy.
    az, labels = _ring(lambda a: "none" if abs(a) > 135 else _truth(a))
    janus, kept, acc, _, _ = P3.score_ring(az, labels)
    assert (janus, kept) == (False, True) and acc["back"] == 0.0 and acc["side"] == 1.0
    # Two separate front runs on the sides.
    az, labels = _ring(lambda a: "front" if a in (90.0, -90.0) else "side")
    assert P3.score_ring(az, labels)[0] is True


def _tiny_pixel_prior(folder: Path) -> Path:
    """A randomly initialised 16 px pixel-space prior with the tiny CLIP text encoder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from threestudio_perpneg.tiny import build_tiny_stable_diffusion

    path = build_tiny_stable_diffusion(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32),
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=32,
            attention_head_dim=8,
        )
    import shutil

    shutil.rmtree(path / "unet")
    unet.save_pretrained(path / "unet", safe_serialization=True)
    shutil.rmtree(path / "scheduler")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        path / "scheduler"
    )
    return path


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> Path:
    return _tiny_pixel_prior(tmp_path_factory.mktemp("prior") / "tiny-pixel")


@pytest.fixture(scope="module")
def engine(prior: Path):
    from threestudio_perpneg.engines.pixel import PerpNegIFEngine, load_deepfloyd_if

    return PerpNegIFEngine(*load_deepfloyd_if(str(prior)))


class _Fixed:
    """A classifier stand-in that returns the ground-truth view of each ring azimuth."""

    def __init__(self) -> None:
        self.calls = 0

    def classify(self, images):
        self.calls += 1
        n = images.shape[0]
        return type("C", (), {"views": [_truth(a) for a in P3.ring_azimuths(n)]})()


@pytest.mark.parametrize(
    "method, scheme, batch",
    [
        ("noview", "threestudio", 1),
        ("vanilla", "threestudio", 4),
        ("ours", "authors", 1),
        ("ours", "threestudio", 4),
    ],
)
def test_each_method_runs_and_moves_the_texture(
    prior: Path, engine, method: str, scheme: str, batch: int
) -> None:
    cfg = P3.Protocol3DConfig(
        method=method,
        scheme=scheme,
        batch_size=batch,
        steps=2,
        texture_size=8,
        ring_views=8,
        seed=3,
    )
    clf = _Fixed()
    res = P3.run_object(cfg, prior, clf, "a corgi", engine=engine)
    init = torch.sigmoid(torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(3)))
    assert res.texture.shape == init.shape
    assert (res.texture - init).abs().max() > 1e-4  # the SDS gradient reached the texture
    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    assert clf.calls == 1 and res.ring_images.shape == (8, 3, 16, 16)
    assert res.janus is False and res.front_kept is True  # the stand-in classifier's truth ring
    if method == "ours":
        assert res.unet_rows_per_step > 2 * batch  # Perp-Neg negatives are evaluated
    else:
        assert res.unet_rows_per_step == 2 * batch  # conditional + unconditional rows only
    if batch == 4:
        again = P3.run_object(cfg, prior, clf, "a corgi", engine=engine)
        assert torch.equal(again.texture, res.texture)  # seeded


def test_objects_optimised_together_equal_objects_optimised_alone(prior: Path, engine) -> None:
    cfg = P3.Protocol3DConfig(method="ours", batch_size=2, steps=2, texture_size=8, ring_views=8)
    clf = _Fixed()
    together = P3.run_objects(
        cfg, [5, 9], prior, clf, ["a corgi", "a corgi, front view"], engine=engine
    )
    for seed, prompt, obj in zip([5, 9], ["a corgi", "a corgi, front view"], together):
        alone = P3.run_object(
            P3.Protocol3DConfig(**{**cfg.to_dict(), "seed": seed}),
            prior,
            clf,
            prompt,
            engine=engine,
        )
        assert torch.allclose(obj.texture, alone.texture, atol=1e-4), (
            (obj.texture - alone.texture).abs().max()
        )
        assert obj.unet_rows_per_step == alone.unet_rows_per_step
    assert not torch.allclose(together[0].texture, together[1].texture)


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="method: unknown method 'dreamfusion'"):
        P3.Protocol3DConfig(method="dreamfusion")
    with pytest.raises(ValueError, match="batch_size"):
        P3.Protocol3DConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_step_percent"):
        P3.Protocol3DConfig(min_step_percent=0.9, max_step_percent=0.1)


class _FaceEverywhere:
    """A classifier stand-in that sees a front and the identity 'robot' in every view."""

    def classify(self, images):
        n = images.shape[0]
        return type("C", (), {"views": ["front"] * n, "identities": ["robot"] * n})()


def test_table_rows_count_the_objects_and_rings_are_drawn(prior: Path, tmp_path: Path) -> None:
    from PIL import Image

    base = P3.Protocol3DConfig(steps=1, texture_size=8, ring_views=8)
    from threestudio_perpneg.testbed.table3d import MethodSpec

    methods = [MethodSpec("vanilla", 1), MethodSpec("ours", 1, "authors")]
    from threestudio_perpneg.testbed import table3d as T3

    rows, results = T3.run_table3d(
        prior,
        _FaceEverywhere(),
        [0, 1],
        methods=methods,
        base=base,
        identities=("robot", "clown"),
        progress=False,
    )
    assert [(r["method"], r["batch"], r["scheme"], r["seeds"]) for r in rows] == [
        ("vanilla", 1, None, 2),
        ("ours", 1, "authors", 2),
    ]
    for row in rows:
        # Fronts everywhere: every object is Janus (front at the back cameras) and keeps its front.
        assert row["janus"] == 2 and row["front_kept"] == 2
        assert row["view_accuracy"] == {"front": 1.0, "side": 0.0, "back": 0.0}
        assert row["identity_agreement"] == 0.5  # seed 0 asked for robot, seed 1 for clown
    # The picture shows the detail renders (4 x 16 px), whatever the zoom of the fallback.
    out = T3.save_rings(tmp_path / "rings.png", results, max_seeds=1, zoom=2)
    with Image.open(out) as im:
        assert im.size == (200 + 8 * 64, 2 * (64 + 14) + 14)
    bare = {k: [o._replace(ring_images_detail=None) for o in v] for k, v in results.items()}
    out = T3.save_rings(tmp_path / "rings16.png", bare, max_seeds=1, zoom=2)
    with Image.open(out) as im:
        assert im.size == (200 + 8 * 32, 2 * (32 + 14) + 14)


def test_detail_ring_is_the_same_object_from_the_same_cameras(prior: Path, engine) -> None:
    from threestudio_perpneg.testbed import scenes

    cfg = P3.Protocol3DConfig(steps=2, texture_size=8, ring_views=8, seed=5)
    res = P3.run_object(cfg, prior, _Fixed(), "a corgi", engine=engine)
    detail = res.ring_images_detail
    assert detail is not None and detail.shape == (8, 3, 16 * P3.RING_DETAIL, 16 * P3.RING_DETAIL)
    # Rendered here from the returned texture with the ring's cameras (azimuth k*45, elevation 0,
    # the prior's mid distance and field of view: the tiny prior has no testbed.json, so the
    # dataset defaults), at 64 px: the same picture.
    from threestudio_perpneg.testbed.dataset import DatasetConfig

    d = DatasetConfig()
    want = scenes.render(
        res.texture,
        [45.0 * k if k <= 4 else 45.0 * k - 360.0 for k in range(8)],
        [0.0] * 8,
        sum(d.camera_distance_range) / 2,
        size=64,
        fovy_deg=d.fovy_deg,
        background=d.background,
    )
    torch.testing.assert_close(detail, want)
    # And the classifier's 16 px ring is that picture at a coarser resolution.
    pooled = torch.nn.functional.avg_pool2d(detail, P3.RING_DETAIL)
    assert (pooled - res.ring_images).abs().mean() < 0.03


def test_rings_picture_draws_the_reference_row_first(prior: Path, tmp_path: Path) -> None:
    from PIL import Image

    from threestudio_perpneg.testbed import table3d as T3

    shipped = Path(T3.__file__).resolve().parents[2] / "benchmarks/results/testbed-sweep/priors/p55"
    if not shipped.is_dir():
        pytest.skip(f"no shipped level prior at {shipped}")
    base = P3.Protocol3DConfig(ring_views=12)
    label, ref = T3.reference_ring(shipped, "troll", base)
    assert label == "clean troll" and ref.shape == (12, 3, 64, 64)
    # The clean head seen by the shipped classifier at the prior's 16 px: its true views.
    from threestudio_perpneg.testbed.classifier import load_classifier

    views = load_classifier().classify(torch.nn.functional.avg_pool2d(ref, 4)).views
    truth = [_truth(a) for a in P3.ring_azimuths(12)]
    assert sum(v == t for v, t in zip(views, truth)) >= 10, views
    res = P3.ObjectResult(
        janus=False,
        front_kept=True,
        view_accuracy={},
        ring_azimuths=P3.ring_azimuths(12),
        ring_labels=truth,
        ring_truth=truth,
        flags={},
        unet_rows_per_step=2.0,
        losses=[],
        texture=torch.zeros(3, 8, 16),
        ring_images=torch.zeros(12, 3, 16, 16),
        seconds=0.0,
        ring_images_detail=torch.ones(12, 3, 64, 64),
    )
    spec = T3.MethodSpec("vanilla", 4)
    out = T3.save_rings(tmp_path / "r.png", {spec: [res]}, reference=(label, ref))
    with Image.open(out) as im:
        assert im.size == (200 + 12 * 64, 2 * (64 + 14) + 14)
        px = im.convert("RGB").load()
        # Reference row first (tile centre = the reference's pixel), then the object (white).
        want = tuple(int(round(float(c) * 255)) for c in ref[0, :, 32, 32])
        assert px[200 + 32, 14 + 32] == want
        assert px[200 + 32, 14 + 78 + 32] == (255, 255, 255)


def test_reference_ring_names_a_missing_prior(tmp_path: Path) -> None:
    from threestudio_perpneg.testbed import table3d as T3

    with pytest.raises(FileNotFoundError, match="prior_path: .* has no unet/config.json"):
        T3.reference_ring(tmp_path, "troll")


@pytest.mark.parametrize("identity", ["alien", "troll"])
def test_shipped_classifier_flags_a_two_faced_head_and_not_a_normal_one(identity: str) -> None:
    from threestudio_perpneg.testbed import scenes
    from threestudio_perpneg.testbed.classifier import load_classifier

    clf = load_classifier()
    tex = scenes.identity_texture(identity, 32)
    w = tex.shape[-1]
    # A second face: the back half (|azimuth| > 90) replaced by the front half turned around.
    two = tex.clone()
    rolled = torch.roll(tex, w // 2, dims=-1)
    two[..., : w // 4], two[..., 3 * w // 4 :] = rolled[..., : w // 4], rolled[..., 3 * w // 4 :]
    az = P3.ring_azimuths(12)
    for texture, janus in ((tex, False), (two, True)):
        ring = scenes.render(texture, torch.tensor(az), torch.zeros(12), 3.0, size=16)
        got_janus, kept, _, _, _ = P3.score_ring(az, clf.classify(ring).views)
        assert (got_janus, kept) == (janus, True)


def test_controls_reach_the_3d_protocol(prior: Path, engine) -> None:
    base = dict(method="ours", batch_size=4, steps=2, texture_size=8, ring_views=8, seed=4)
    clf = _Fixed()
    full = P3.run_object(P3.Protocol3DConfig(**base), prior, clf, "a corgi", engine=engine)
    # No timestep lies in [0, 0] (t >= min_step > 0) and λ = 0 removes every negative: both are
    # plain CFG on the interpolated positive, on the same draws.
    gated = P3.run_object(
        P3.Protocol3DConfig(**base, perp_neg_t_range=(0.0, 0.0)),
        prior,
        clf,
        "a corgi",
        engine=engine,
    )
    zero = P3.run_object(
        P3.Protocol3DConfig(**base, perp_neg_weight_scale=0.0), prior, clf, "a corgi", engine=engine
    )
    assert gated.unet_rows_per_step == zero.unet_rows_per_step == 2 * 4
    assert torch.allclose(gated.texture, zero.texture, atol=1e-6)
    assert not torch.allclose(gated.texture, full.texture, atol=1e-6)
    one = P3.run_object(
        P3.Protocol3DConfig(**base, perp_neg_sampling="one"), prior, clf, "a corgi", engine=engine
    )
    assert 2 * 4 <= one.unet_rows_per_step <= 3 * 4 < full.unet_rows_per_step + 1e-9
    sched = P3.Protocol3DConfig(**base, perp_neg_weight_scale=[0, 1.0, 0.0, 2])
    assert sched.controls_at(0).weight_scale == 1.0 and sched.controls_at(1).weight_scale == 0.5
    with pytest.raises(ValueError, match="apply to method 'ours' only"):
        P3.Protocol3DConfig(method="vanilla", perp_neg_sampling="one")
    with pytest.raises(ValueError, match="perp_neg_sampling"):
        P3.Protocol3DConfig(method="ours", perp_neg_sampling="some")


def test_max_step_schedule_reaches_the_unet(prior: Path, engine) -> None:
    """A ``max_step_percent`` schedule bounds each step's SDS timesteps as threestudio's C()."""
    seen = []
    hook = engine.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).max()
        ),
        with_kwargs=True,
    )
    try:
        cfg = P3.Protocol3DConfig(
            method="vanilla",
            batch_size=4,
            steps=3,
            texture_size=8,
            ring_views=8,
            min_step_percent=0.02,
            max_step_percent=[1, 0.98, 0.03, 2],  # 0.98 at step 0 and 1, 0.03 from step 2
        )
        P3.run_object(cfg, prior, _Fixed(), "a corgi", engine=engine)
    finally:
        hook.remove()
    n_train = engine.num_train_timesteps
    assert len(seen) == 3
    assert int(seen[2]) <= int(0.03 * n_train)  # the last step is bounded by the schedule's end
    assert max(int(t) for t in seen[:2]) > int(0.03 * n_train)  # earlier steps reach higher


def test_max_step_schedule_is_validated_and_the_testbed_default_anneals() -> None:
    with pytest.raises(ValueError, match="max_step_percent: expected end_step > start_step"):
        P3.Protocol3DConfig(max_step_percent=[5, 0.98, 0.3, 5])
    with pytest.raises(ValueError, match="min_step_percent/max_step_percent: .*every value"):
        P3.Protocol3DConfig(max_step_percent=[0, 1.5, 0.3, 10])
    with pytest.raises(ValueError, match="min_step_percent/max_step_percent"):
        P3.Protocol3DConfig(min_step_percent=0.5, max_step_percent=[0, 0.98, 0.3, 10])
    cfg = P3.Protocol3DConfig.testbed_default(400, method="noview")
    assert cfg.steps == 400 and cfg.method == "noview"
    assert cfg.max_step_percent == [0, 0.98, 0.3, 300]
