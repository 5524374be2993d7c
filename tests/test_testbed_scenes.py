"""Testbed renderer: determinism, camera convention, analytic projection, labels, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from threestudio_perpneg.testbed import scenes


def _flat(rgb, h: int = 16) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, h, 2 * h).clone()


def test_render_is_deterministic_and_texture_jitter_is_seeded() -> None:
    tex = scenes.identity_texture("clown", 32)
    az, el = torch.tensor([0.0, 100.0, -170.0]), torch.tensor([0.0, 20.0, -5.0])
    assert torch.equal(scenes.render(tex, az, el), scenes.render(tex, az, el))
    a = scenes.identity_texture("clown", 32, jitter=0.5, generator=torch.Generator().manual_seed(3))
    b = scenes.identity_texture("clown", 32, jitter=0.5, generator=torch.Generator().manual_seed(3))
    c = scenes.identity_texture("clown", 32, jitter=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.01
    assert tex.shape == (3, 32, 64) and 0.0 <= float(tex.min()) and float(tex.max()) <= 1.0


def test_silhouette_matches_the_analytic_projection_of_the_sphere() -> None:
    # A sphere of radius 1 at distance d subtends asin(1/d); on the image plane its radius is
    # tan(asin(1/d)) / tan(fovy/2) in half-image units, so it covers pi*r^2/4 of the image.
    size, d, fovy = 64, 3.0, 45.0
    img = scenes.render(
        torch.ones(3, 8, 16),
        torch.tensor([30.0]),
        torch.tensor([10.0]),
        camera_distance=d,
        size=size,
        fovy_deg=fovy,
        background=0.0,
        shading=False,
        supersample=4,
    )
    r = math.tan(math.asin(1.0 / d)) / math.tan(math.radians(fovy) / 2)
    assert float(img.mean()) == pytest.approx(math.pi * r * r / 4.0, rel=0.02)
    # The silhouette is centred: the corners are background, the centre is the object.
    assert (
        float(img[0, :, 0, 0].max()) == 0.0 and float(img[0, :, size // 2, size // 2].min()) == 1.0
    )


def test_camera_convention_matches_threestudio() -> None:
    # Texture: red on the head's +y half (azimuth 0..180), blue on the -y half; green crown.
    h = 32
    tex = _flat((0.0, 0.0, 1.0), h)
    tex[:, :, h:] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    tex[:, : h // 4] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # polar angle < 45 degrees
    kw = dict(size=32, shading=False, background=1.0)
    front = scenes.render(tex, torch.tensor([0.0]), torch.tensor([0.0]), **kw)[0]
    # threestudio: camera at azimuth 0 sits on +x looking at -x, image right = lookat x up = +y.
    right, left = front[:, 16, 22], front[:, 16, 10]
    assert right.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-4)
    assert left.tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-4)
    # z is up: the crown is at the top of the image.
    green = (front[1] > 0.99) & (front[0] < 0.01) & (front[2] < 0.01)
    assert green[:8].any() and not green[16:].any()
    # A camera at azimuth +90 (on +y) sees only the red half.
    side = scenes.render(tex, torch.tensor([90.0]), torch.tensor([0.0]), **kw)[0]
    assert side[:, 16, 12:21].min(dim=-1).values.tolist() == pytest.approx(
        [1.0, 0.0, 0.0], abs=1e-4
    )
    # Straight overhead the camera sees only the crown.
    top = scenes.render(tex, torch.tensor([0.0]), torch.tensor([90.0]), **kw)[0]
    assert top[:, 16, 16].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-4)


@pytest.mark.parametrize("identity", scenes.IDENTITIES)
def test_front_shows_skin_and_face_back_shows_hair(identity: str) -> None:
    look = scenes._LOOKS[identity]
    tex = scenes.identity_texture(identity, 64)
    img = scenes.render(
        tex, torch.tensor([0.0, 180.0]), torch.zeros(2), size=32, shading=False, background=0.0
    )
    front, back = img[0], img[1]
    skin, hair = torch.tensor(look.skin), torch.tensor(look.hair)
    # Cheeks (below the eyes, beside the nose) are skin; the back of the head is hair.
    cheek = front[:, 20, 8]
    assert (cheek - skin).abs().max() < 0.05
    assert (back[:, 14:18, 14:18].mean(dim=(1, 2)) - hair).abs().max() < 0.1

    # The eye whites (near-white in every channel, unlike any skin or hair) show on the front only.
    def whites(im: torch.Tensor) -> int:
        return int((im.min(dim=0).values > 0.75).sum())

    assert whites(front) >= 4 and whites(back) == 0


def test_featureless_texture_has_no_face_or_ears() -> None:
    with_face = scenes.identity_textures(["robot"], 32)[0]
    bald = scenes.identity_textures(["robot"], 32, features=False)[0]
    skin = torch.tensor(scenes._LOOKS["robot"].skin)
    # Rows 14-22 (polar 79-124 degrees) hold the eyes, nose, mouth and ears; bald there is skin,
    # except for the hair that covers the back (|azimuth| > 95, columns < 15 or > 48).
    band = bald[:, 14:22, 16:48]
    assert (band - skin[:, None, None]).abs().max() < 1e-3
    assert (with_face[:, 14:22, 16:48] - skin[:, None, None]).abs().max() > 0.3


def test_identities_differ_from_every_side() -> None:
    renders = {
        i: scenes.render(
            scenes.identity_texture(i, 32), torch.tensor([0.0, 90.0, 180.0]), torch.zeros(3)
        )
        for i in scenes.IDENTITIES
    }
    names = list(renders)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            diff = (renders[names[a]] - renders[names[b]]).abs().mean(dim=(1, 2, 3))
            assert diff.min() > 0.05, (names[a], names[b], diff.tolist())


def test_render_is_differentiable_in_the_texture_and_sees_only_the_visible_half() -> None:
    tex = torch.full((3, 16, 32), 0.5, requires_grad=True)
    scenes.render(tex, torch.tensor([0.0]), torch.tensor([0.0]), size=16).sum().backward()
    grad = tex.grad.abs().sum(0)  # [16, 32]; columns 8..24 are azimuth -90..90
    assert grad[8, 16] > 0  # the face centre
    assert grad[:, :4].sum() == 0 and grad[:, -4:].sum() == 0  # the back of the head


def test_batched_textures_and_cameras() -> None:
    texs = torch.stack([scenes.identity_texture(i, 16) for i in ("alien", "robot")])
    az, el = torch.tensor([0.0, 45.0]), torch.tensor([0.0, 10.0])
    both = scenes.render(texs, az, el, size=16)
    for k in range(2):
        one = scenes.render(texs[k], az[k : k + 1], el[k : k + 1], size=16)
        assert torch.allclose(both[k], one[0], atol=1e-6)


def test_view_labels_use_threestudio_buckets() -> None:
    az = [0.0, 44.0, 46.0, -90.0, 134.0, 136.0, -179.0, 180.0, 30.0, 400.0]
    el = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 61.0, 0.0]
    expected = [
        "front",
        "front",
        "side",
        "side",
        "side",
        "back",
        "back",
        "back",
        "overhead",
        "front",
    ]
    assert scenes.view_label(torch.tensor(az), torch.tensor(el)) == expected


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="identity: unknown identity 'dog'"):
        scenes.identity_texture("dog")
    tex = torch.ones(3, 8, 16)
    with pytest.raises(ValueError, match="camera_distance"):
        scenes.render(tex, torch.zeros(1), torch.zeros(1), camera_distance=0.5)
    with pytest.raises(ValueError, match="elevation_deg"):
        scenes.render(tex, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="texture"):
        scenes.render(torch.ones(4, 8, 16), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="jitter"):
        scenes.identity_texture("alien", jitter=2.0)
