"""Janus testbed (issue 11): a small prior trained on procedural head renders, and its protocols.

* :mod:`.scenes`: the head family (fixed sphere, procedural textures per identity), a differentiable
  renderer with threestudio's camera convention and ground-truth view labels.
* :mod:`.dataset`: captioned renders with web-like view statistics (:class:`~.dataset.DatasetConfig`).
* :mod:`.classifier`: a small CNN for the view and identity of testbed renders.
* :mod:`.prior`, :mod:`.train`: the pixel-space text-to-image prior (diffusers checkpoint folder).
* :mod:`.protocol2d`, :mod:`.protocol3d`: prior bias in 2D, SDS on a learnable texture in 3D.

Importing this package imports nothing heavy; import the submodules you need.
"""

from __future__ import annotations
