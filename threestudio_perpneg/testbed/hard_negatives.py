"""Hard negatives for the testbed classifier: heads that look like the prior's colours but show no view.

SDS on an uninformed prior converges to heads in the identity's skin and hair with no face (the
rings of issue 17), and a classifier trained only on clean renders and noise fields read those as
fronts from every camera. These renders teach it the label rule of the testbed:

* ``front``: the eyes are drawn (with or without the rest of the face);
* ``side``: an ear is drawn, seen from the side;
* ``back``: hair covers the head down to the neck and no face is visible;
* :data:`~threestudio_perpneg.testbed.classifier.REJECT` (``"none"``): anything else.

So a head whose face is missing, faint, smeared or reduced to a mouth or a nose is ``none`` where a
real head would show its eyes, and a head with hair on the crown only is ``none`` from behind too.
Each kind is drawn only from the cameras where the rule decides it: a featureless head seen from
the side differs from a real one by a small ear (about 2 px at 16 px) and from behind not at all,
so those cameras are left out (their label would be a guess, not a rule).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scenes

__all__ = ["HARD_NEGATIVE_KINDS", "binomial_blur", "render_hard_negatives", "smear"]

#: The kinds, drawn with equal probability; :func:`render_hard_negatives` says what each is.
HARD_NEGATIVE_KINDS: Tuple[str, ...] = (
    "featureless",
    "featureless-random-colours",
    "hairline-only",
    "noisy",
    "blurred",
    "faint-features",
    "smeared-features",
    "mouth-or-nose-only",
)
#: Cameras where a real head shows both eyes (degrees of azimuth from the face).
FACE_AZIMUTH = 60.0
#: Behind this azimuth a real head shows hair down to the neck (the hairline's back half).
BACK_AZIMUTH = 145.0


def binomial_blur(x: Tensor, passes: int = 1) -> Tensor:
    """``passes`` rounds of a 3×3 binomial filter (about a Gaussian of σ = 0.7·√passes px)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = ((k[:, None] * k[None]) / 16.0).expand(x.shape[1], 1, 3, 3)
    for _ in range(passes):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
    return x


def smear(texture: Tensor, width_texels: int) -> Tensor:
    """Box filter of ``width_texels`` along the azimuth (wrapping): features become smudges."""
    w = max(1, int(width_texels))
    pad = w // 2
    x = (
        torch.cat([texture[..., -pad:], texture, texture[..., : w - 1 - pad]], dim=-1)
        if w > 1
        else texture
    )
    c = texture.shape[-3]
    kernel = torch.full((c, 1, 1, w), 1.0 / w)
    return F.conv2d(x, kernel, groups=c)


def _indices(kind: Tensor, name: str) -> List[int]:
    """Sample indices of one kind (for the per-sample filters)."""
    return torch.nonzero(kind == HARD_NEGATIVE_KINDS.index(name)).flatten().tolist()


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def render_hard_negatives(
    n: int,
    generator: torch.Generator,
    *,
    identities: Sequence[str] = scenes.IDENTITIES,
    resolution: int = 16,
    elevation_range_deg: Tuple[float, float] = (-10.0, 45.0),
    camera_distance_range: Tuple[float, float] = (2.6, 3.4),
    fovy_deg: float = scenes.DEFAULT_FOVY,
) -> Tuple[Tensor, Tensor]:
    """``n`` renders in [0, 1] that show no head view by the module's rule, and their kind index.

    Kinds (:data:`HARD_NEGATIVE_KINDS`, equally likely), every one in a random identity's skin and
    hair (colour-jittered as the clean renders are) unless said otherwise:

    * ``featureless``: skin and hair, no face, no ears; cameras within ±60° of the face.
    * ``featureless-random-colours``: the same in random skin and hair colours with a random
      hairline height (SDS can shift or saturate colours).
    * ``hairline-only``: hair on the crown only, down to the front hairline all round; cameras
      within ±60° of the face or behind ±145° (where a real head shows hair to the neck).
    * ``noisy``: a featureless head with pixel noise of σ 0.05-0.2 (unfinished SDS).
    * ``blurred``: a featureless head blurred by 2-6 binomial passes (σ about 1-1.7 px).
    * ``faint-features``: the real face blended over the featureless head at opacity 0-0.25.
    * ``smeared-features``: the real head smeared along the azimuth by a box of 40-90°, so the
      eyes run into the skin.
    * ``mouth-or-nose-only``: the real face with the eyes (and brows) painted over by skin.

    Returns:
        ``(images [n, 3, R, R], kind [n])``, kind indexing :data:`HARD_NEGATIVE_KINDS`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    g = generator
    size = max(16, resolution)
    kind = torch.randint(len(HARD_NEGATIVE_KINDS), (n,), generator=g)
    names = [identities[int(i)] for i in torch.randint(len(identities), (n,), generator=g)]
    # The same jitter draw for both, so a head and its featureless twin share their colours.
    state = g.get_state()
    real = scenes.identity_textures(names, size, jitter=1.0, generator=g)
    g.set_state(state)
    bald = scenes.identity_textures(names, size, jitter=1.0, generator=g, features=False)
    h, w = size, 2 * size

    def is_(name: str) -> Tensor:
        return (kind == HARD_NEGATIVE_KINDS.index(name)).view(n, 1, 1, 1)

    tex = bald.clone()
    # Random colours: hair above a random hairline, skin below (the whole way round).
    rows = torch.arange(h).view(1, 1, h, 1)
    hairline = torch.randint(2, h // 2, (n, 1, 1, 1), generator=g)
    plain = torch.where(
        rows < hairline, torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    ).expand(n, 3, h, w)
    tex = torch.where(is_("featureless-random-colours"), plain, tex)
    # Crown only: the front's column (hair above the front hairline, skin below) all the way round.
    crown = bald[..., :, w // 2 : w // 2 + 1].expand(n, 3, h, w)
    tex = torch.where(is_("hairline-only"), crown, tex)
    # Faint face: opacity 0-0.25 of the real texture over the featureless one.
    alpha = 0.25 * torch.rand(n, 1, 1, 1, generator=g)
    tex = torch.where(is_("faint-features"), bald + alpha * (real - bald), tex)
    # Smeared face: a box along the azimuth of 40-90° (the eyes are 25° from the centre line).
    widths = torch.randint(
        max(1, round(40 / 360 * w)), max(2, round(90 / 360 * w)) + 1, (n,), generator=g
    )
    for i in _indices(kind, "smeared-features"):  # only the heads of that kind are smeared
        tex[i] = smear(real[i : i + 1], int(widths[i]))[0]
    # Mouth or nose only: the brows and eyes (polar 50°-99°, |azimuth| < 55°) repainted from
    # the featureless twin.
    theta = (torch.arange(h, dtype=torch.float32) + 0.5) * 180.0 / h
    phi = (torch.arange(w, dtype=torch.float32) + 0.5) * 360.0 / w - 180.0
    band = ((theta >= 50.0) & (theta <= 99.0))[:, None] & (phi.abs() < 55.0)[None]
    no_eyes = torch.where(band.view(1, 1, h, w), bald, real)
    tex = torch.where(is_("mouth-or-nose-only"), no_eyes, tex)

    # Cameras: within ±60° of the face; hairline-only also from behind.
    az = _uniform(n, -FACE_AZIMUTH, FACE_AZIMUTH, g)
    behind = (kind == HARD_NEGATIVE_KINDS.index("hairline-only")) & (
        torch.rand(n, generator=g) < 0.5
    )
    back_az = _uniform(n, BACK_AZIMUTH, 180.0, g) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0
    )
    az = torch.where(behind, back_az, az)
    el = _uniform(n, *elevation_range_deg, g)
    dist = _uniform(n, *camera_distance_range, g)
    images = scenes.render(tex, az, el, camera_distance=dist, size=resolution, fovy_deg=fovy_deg)

    # Image-space kinds.
    sigma = _uniform(n, 0.05, 0.2, g).view(n, 1, 1, 1)
    noisy = images + sigma * torch.randn(images.shape, generator=g)
    images = torch.where(is_("noisy"), noisy, images)
    passes = torch.randint(2, 7, (n,), generator=g)
    for i in _indices(kind, "blurred"):
        images[i] = binomial_blur(images[i : i + 1], int(passes[i]))[0]
    return images.clamp(0.0, 1.0), kind
