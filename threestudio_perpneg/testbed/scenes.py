"""Procedural heads: a fixed unit sphere with a per-identity texture, rendered differentiably.

The object family has an unmistakable front: a face (eyes, brows, nose, mouth) centred at head
azimuth 0, ears on the sides (±90°), hair covering the back (180°) and the crown. Identities are
named by words and differ in skin, hair, eye and mouth colours and slightly in feature sizes, so an
identity is recognisable from every side (the back shows the hair colour).

Texture: equirectangular ``[3, H, 2H]`` in [0, 1]; the column coordinate is the head azimuth
φ ∈ [−180°, 180°] (left to right, φ = atan2(y, x) of the surface point), the row coordinate the
polar angle θ ∈ [0°, 180°] from the top (+z) down.

Cameras follow threestudio's random-camera data module: the camera sits at
``d·(cos e·cos a, cos e·sin a, sin e)`` (azimuth ``a`` and elevation ``e`` in degrees, z up),
looks at the origin, image right = lookat × up. A camera at azimuth ``a`` sees the texture
centred at φ = a, so azimuth 0 is the front view. The renderer intersects rays with the sphere
analytically and samples the texture with ``grid_sample``: the image is differentiable in the
texture (used by the 3D protocol's learnable texture) and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.views import VIEW_NAMES, ViewThresholds, classify_views

__all__ = [
    "IDENTITIES",
    "DEFAULT_DISTANCE",
    "DEFAULT_FOVY",
    "DEFAULT_BACKGROUND",
    "HEAD_RADIUS",
    "Identity",
    "identity_texture",
    "identity_textures",
    "render",
    "view_label",
]

#: Radius of the head sphere (world units); it is centred at the origin.
HEAD_RADIUS = 1.0
#: Default camera distance (world units): the head fills about 85 % of the image height at 45°.
DEFAULT_DISTANCE = 3.0
#: Default vertical field of view (degrees).
DEFAULT_FOVY = 45.0
#: Default background grey level in [0, 1].
DEFAULT_BACKGROUND = 1.0

RGB = Tuple[float, float, float]


@dataclass(frozen=True)
class Identity:
    """Colours (RGB in [0, 1]) and feature scales of one head identity."""

    skin: RGB
    hair: RGB
    pupil: RGB
    mouth: RGB
    nose: RGB
    eye_scale: float = 1.0
    mouth_scale: float = 1.0


#: Identity word -> its look. Skin and hair colours are pairwise far apart (and far from the white
#: background), so the identity survives at 16-32 px from any side.
_LOOKS: Dict[str, Identity] = {
    "alien": Identity(
        skin=(0.40, 0.78, 0.32),
        hair=(0.42, 0.12, 0.58),
        pupil=(0.05, 0.05, 0.05),
        mouth=(0.15, 0.30, 0.10),
        nose=(0.28, 0.58, 0.22),
        eye_scale=1.3,
    ),
    "robot": Identity(
        skin=(0.62, 0.68, 0.80),
        hair=(0.10, 0.18, 0.50),
        pupil=(0.90, 0.10, 0.10),
        mouth=(0.20, 0.22, 0.28),
        nose=(0.45, 0.50, 0.62),
        mouth_scale=1.2,
    ),
    "clown": Identity(
        skin=(0.96, 0.72, 0.66),
        hair=(0.98, 0.50, 0.05),
        pupil=(0.10, 0.35, 0.85),
        mouth=(0.85, 0.05, 0.10),
        nose=(0.95, 0.10, 0.10),
        mouth_scale=1.3,
    ),
    "troll": Identity(
        skin=(0.58, 0.38, 0.22),
        hair=(0.95, 0.88, 0.20),
        pupil=(0.05, 0.30, 0.10),
        mouth=(0.30, 0.12, 0.08),
        nose=(0.45, 0.28, 0.15),
        mouth_scale=1.15,
    ),
}

#: Identity words, in a fixed order (class indices of the testbed classifier).
IDENTITIES: Tuple[str, ...] = tuple(_LOOKS)


def _check_identity(identity: str) -> Identity:
    look = _LOOKS.get(identity) if isinstance(identity, str) else None
    if look is None:
        raise ValueError(f"identity: unknown identity {identity!r}, expected one of {IDENTITIES}")
    return look


def _check_size(key: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{key}: expected an integer >= {lo}, got {value!r}")
    return value


def _wrap_deg(x: Tensor) -> Tensor:
    return torch.remainder(x + 180.0, 360.0) - 180.0


def _smoothstep(x: Tensor, lo: float, hi: float) -> Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def identity_texture(
    identity: str,
    size: int = 64,
    *,
    jitter: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Equirectangular texture ``[3, size, 2*size]`` in [0, 1] of one identity.

    Args:
        identity: one of :data:`IDENTITIES`.
        size: texture height in texels (the width is twice that), at least 8.
        jitter: strength of random variation in [0, 1]: colours move by up to 0.1·jitter per
            channel, face features and the hairline by up to 4°·jitter, feature sizes by up to
            15 %·jitter. 0 gives the canonical texture (and draws nothing from ``generator``).
        generator: random source for the jitter (the global one when None).
    """
    return identity_textures([identity], size, jitter=jitter, generator=generator)[0]


def identity_textures(
    identities: Sequence[str],
    size: int = 64,
    *,
    jitter: float = 0.0,
    generator: Optional[torch.Generator] = None,
    features: bool = True,
) -> Tensor:
    """Batched :func:`identity_texture`: ``[n, 3, size, 2*size]``, one jittered texture each.

    ``features=False`` leaves out the face and the ears (skin and hair only): the featureless
    head that the testbed classifier learns not to call a front.
    """
    looks = [_check_identity(i) for i in identities]
    if not looks:
        raise ValueError("identities: expected at least one identity, got none")
    size = _check_size("size", size, 8)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= 1:
        raise ValueError(f"jitter: expected a number in [0, 1], got {jitter!r}")
    n = len(looks)
    # One draw for all the per-texture randomness: 15 colour channels, 6 positions, 3 scales.
    if jitter == 0:
        noise = torch.zeros(n, 24)
    else:
        noise = (torch.rand(n, 24, generator=generator) * 2.0 - 1.0) * float(jitter)

    def param(values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32)

    def colour(name: str, k: int) -> Tensor:
        base = param([getattr(look, name) for look in looks])  # [n, 3]
        return (base + 0.1 * noise[:, 3 * k : 3 * k + 3]).clamp(0.0, 1.0)[:, :, None, None]

    skin, hair, pupil = colour("skin", 0), colour("hair", 1), colour("pupil", 2)
    mouth, nose = colour("mouth", 3), colour("nose", 4)
    pos = 4.0 * noise[:, 15:21, None, None]  # degrees: eye az, eye height, mouth, nose, hairline x2
    scale = 1.0 + 0.15 * noise[:, 21:24, None, None]  # eyes, mouth, ears

    h, w = size, 2 * size
    theta = ((torch.arange(h, dtype=torch.float32) + 0.5) * 180.0 / h)[:, None].expand(h, w)
    phi = ((torch.arange(w, dtype=torch.float32) + 0.5) * 360.0 / w - 180.0)[None].expand(h, w)
    edge = 0.6 * 180.0 / h  # soft edge of about one texel, in degrees
    sin_t = torch.sin(torch.deg2rad(theta)).clamp_min(0.05)

    def blob(phi0: Any, theta0: Any, a: Any, b: Any) -> Tensor:
        """Soft ellipse masks ``[n, 1, h, w]`` (radii a along azimuth, b along polar angle)."""
        phi0, theta0, a, b = (torch.as_tensor(x, dtype=torch.float32) for x in (phi0, theta0, a, b))
        dx = _wrap_deg(phi - phi0) * sin_t
        dy = theta - theta0
        r = torch.sqrt((dx / a) ** 2 + (dy / b) ** 2)
        mask = torch.sigmoid(-(r - 1.0) * torch.minimum(a, b) / edge)
        return mask.expand(n, 1, h, w)

    def paint(base: Tensor, mask: Tensor, rgb: Tensor) -> Tensor:
        return base * (1.0 - mask) + rgb * mask

    tex = skin.expand(n, 3, h, w).clone()
    # Chin and neck are a darker skin tone, so the lower half has structure from every side.
    tex = paint(tex, torch.sigmoid((theta - 150.0) / edge).expand(n, 1, h, w), skin * 0.8)
    # Ears on both sides, drawn before the hair so a low hairline can cover their top.
    ear_a, ear_b = 9.0 * scale[:, 2:3], 15.0 * scale[:, 2:3]
    for side in (-90.0, 90.0) if features else ():
        tex = paint(tex, blob(side, 95.0, ear_a, ear_b), skin * 0.75)
        tex = paint(tex, blob(side, 97.0, ear_a * 0.45, ear_b * 0.5), skin * 0.5)
    # Hair: crown everywhere, down to the neck on the back; the hairline drops from ~45° (front,
    # |φ| < 95°) to ~150° (back, |φ| > 140°), leaving the ears visible on the sides.
    back = _smoothstep(_wrap_deg(phi).abs(), 95.0, 140.0)
    hairline = 45.0 + pos[:, 4:5] + (105.0 + pos[:, 5:6]) * back
    strands = 0.85 + 0.15 * torch.cos(torch.deg2rad(phi) * 24.0) ** 2
    tex = paint(tex, torch.sigmoid((hairline - theta) / edge), hair * strands)
    if not features:
        return tex.clamp(0.0, 1.0)
    # Face, centred at φ = 0.
    eye_phi, eye_theta = 25.0 + pos[:, 0:1], 82.0 + pos[:, 1:2]
    es = param([look.eye_scale for look in looks])[:, None, None, None] * scale[:, 0:1]
    white = torch.ones(1, 3, 1, 1)
    # Feature sizes are set for the 16 px prior: at 16 px one pixel spans about 8° at the centre
    # of the head, so pupils (~1.5 px) and the mouth (~2 px tall) survive the render; thinner
    # features (pupils of 1 px, a 1 px mouth) left the prior's samples and SDS faceless.
    for side in (-1.0, 1.0):
        tex = paint(tex, blob(side * eye_phi, eye_theta - 16.0 * es, 13.0 * es, 3.0), hair)
        tex = paint(tex, blob(side * eye_phi, eye_theta, 14.0 * es, 12.0 * es), white)
        tex = paint(tex, blob(side * eye_phi, eye_theta + 1.0, 6.0 * es, 6.0 * es), pupil)
    tex = paint(tex, blob(0.0, 100.0 + pos[:, 3:4], 6.0, 8.0), nose)
    ms = param([look.mouth_scale for look in looks])[:, None, None, None] * scale[:, 1:2]
    tex = paint(tex, blob(0.0, 118.0 + pos[:, 2:3], 22.0 * ms, 8.0), mouth)
    return tex.clamp(0.0, 1.0)


def _as_batch(key: str, value: Union[float, Tensor, Sequence[float]], n: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.dim() == 0:
        t = t.expand(n)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(
            f"{key}: expected a number or a tensor of shape [{n}], got {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{key}: expected finite values, got {t.tolist()}")
    return t


def render(
    texture: Tensor,
    azimuth_deg: Union[Tensor, Sequence[float]],
    elevation_deg: Union[Tensor, Sequence[float]],
    camera_distance: Union[float, Tensor] = DEFAULT_DISTANCE,
    size: int = 32,
    fovy_deg: Union[float, Tensor] = DEFAULT_FOVY,
    background: float = DEFAULT_BACKGROUND,
    *,
    shading: bool = True,
    supersample: int = 2,
) -> Tensor:
    """Render the head with a texture from a batch of cameras: ``[B, 3, size, size]`` in [0, 1].

    Args:
        texture: ``[3, Ht, Wt]`` (shared) or ``[B, 3, Ht, Wt]`` (one per camera) in [0, 1]; the
            image is differentiable in it.
        azimuth_deg: ``[B]`` camera azimuths in degrees (front = 0, threestudio's convention).
        elevation_deg: ``[B]`` camera elevations in degrees (up is positive).
        camera_distance: distance of the camera from the head centre (world units; the head
            has radius 1), a number or ``[B]``; must exceed 1. Default 3.
        size: image side in pixels.
        fovy_deg: vertical field of view in degrees, in (0, 180), a number or ``[B]``. Default 45.
        background: grey level of the background in [0, 1]. Default 1 (white).
        shading: multiply the texture by a head-light Lambert term (ambient 0.55), a 3D cue.
        supersample: rays per pixel side, averaged (anti-aliased silhouette). Default 2.
    """
    if not isinstance(texture, Tensor) or texture.dim() not in (3, 4) or texture.shape[-3] != 3:
        got = tuple(texture.shape) if isinstance(texture, Tensor) else type(texture).__name__
        raise ValueError(f"texture: expected a tensor [3, H, W] or [B, 3, H, W], got {got}")
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32)
    if az.dim() != 1:
        raise ValueError(f"azimuth_deg: expected a 1-D tensor [B], got shape {tuple(az.shape)}")
    n = az.shape[0]
    az = _as_batch("azimuth_deg", az, n)
    el = _as_batch("elevation_deg", elevation_deg, n)
    dist = _as_batch("camera_distance", camera_distance, n)
    if (dist <= HEAD_RADIUS).any():
        raise ValueError(f"camera_distance: expected values > {HEAD_RADIUS}, got {dist.tolist()}")
    size = _check_size("size", size, 1)
    ss = _check_size("supersample", supersample, 1)
    fovy = _as_batch("fovy_deg", fovy_deg, n)
    if ((fovy <= 0.0) | (fovy >= 180.0)).any():
        raise ValueError(f"fovy_deg: expected values in (0, 180) degrees, got {fovy.tolist()}")
    if not 0.0 <= float(background) <= 1.0:
        raise ValueError(f"background: expected a grey level in [0, 1], got {background!r}")
    if texture.dim() == 4 and texture.shape[0] != n:
        raise ValueError(
            f"texture: expected batch size {n} (one per camera) or an unbatched texture, "
            f"got {tuple(texture.shape)}"
        )
    device = texture.device
    az, el, dist, fovy = az.to(device), el.to(device), dist.to(device), fovy.to(device)
    a, e = torch.deg2rad(az), torch.deg2rad(el)
    origin = torch.stack(
        [torch.cos(e) * torch.cos(a), torch.cos(e) * torch.sin(a), torch.sin(e)], -1
    )
    origin = origin * dist[:, None]  # [B, 3]
    lookat = F.normalize(-origin, dim=-1)
    world_up = torch.tensor([0.0, 0.0, 1.0], device=device).expand_as(lookat)
    right = torch.linalg.cross(lookat, world_up)
    # Straight overhead the up vector is degenerate; any right vector then gives a valid camera.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([0.0, 1.0, 0.0], device=device), right)
    right = F.normalize(right, dim=-1)
    up = torch.linalg.cross(right, lookat)

    m = size * ss
    half = torch.tan(torch.deg2rad(fovy) / 2.0)[:, None, None, None]  # [B, 1, 1, 1]
    coords = (torch.arange(m, dtype=torch.float32, device=device) + 0.5) / m * 2.0 - 1.0
    ys, xs = torch.meshgrid(-coords, coords, indexing="ij")  # row 0 is the top of the image
    dirs = lookat[:, None, None, :] + half * (
        xs[None, :, :, None] * right[:, None, None, :] + ys[None, :, :, None] * up[:, None, None, :]
    )
    dirs = F.normalize(dirs, dim=-1)  # [B, m, m, 3]
    o = origin[:, None, None, :]
    b = (o * dirs).sum(-1)
    c = (origin * origin).sum(-1)[:, None, None] - HEAD_RADIUS**2
    disc = b * b - c
    hit = disc > 0
    t = -b - torch.sqrt(disc.clamp_min(0.0))
    normal = (o + t[..., None] * dirs) / HEAD_RADIUS
    normal = F.normalize(normal, dim=-1)
    phi = torch.rad2deg(torch.atan2(normal[..., 1], normal[..., 0]))
    theta = torch.rad2deg(torch.acos(normal[..., 2].clamp(-1.0, 1.0)))

    tex = texture if texture.dim() == 4 else texture[None].expand(n, -1, -1, -1)
    wt = tex.shape[-1]
    # One column of wrap-around padding on each side so bilinear sampling is seamless at φ = ±180.
    tex = torch.cat([tex[..., -1:], tex, tex[..., :1]], dim=-1)
    grid = torch.stack([phi / 180.0 * wt / (wt + 2), theta / 90.0 - 1.0], dim=-1)
    colour = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if shading:
        lambert = (-(normal * dirs).sum(-1)).clamp_min(0.0)
        colour = colour * (0.55 + 0.45 * lambert)[:, None]
    mask = hit[:, None].to(colour.dtype)
    image = colour * mask + float(background) * (1.0 - mask)
    if ss > 1:
        image = F.avg_pool2d(image, ss)
    return image.clamp(0.0, 1.0)


def view_label(
    azimuth_deg: Union[Tensor, Sequence[float]],
    elevation_deg: Union[Tensor, Sequence[float]],
    thresholds: Optional[ViewThresholds] = None,
) -> List[str]:
    """Ground-truth view names (``VIEW_NAMES``) of cameras, with the guidance's own buckets.

    Args:
        azimuth_deg: ``[B]`` camera azimuths in degrees.
        elevation_deg: ``[B]`` camera elevations in degrees.
        thresholds: view buckets; threestudio's defaults (front/back 45°, overhead 60°) if None.
    """
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32).reshape(-1)
    el = _as_batch("elevation_deg", elevation_deg, az.shape[0])
    idx = classify_views(el, az, thresholds or ViewThresholds())
    return [VIEW_NAMES[int(i)] for i in idx]
