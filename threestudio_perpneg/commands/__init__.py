"""Command-line entry points (``python -m threestudio_perpneg COMMAND``) and their shared helpers.

* :mod:`.smoke`: CPU smoke run / 2D Perp-Neg SDS playground (its options: :mod:`.smoke_args`).
* :mod:`.generate`: the 2D sampler's command line (``perpneg-2d``; package: ``args``, ``plan``,
  ``outputs``, ``run``).
* :mod:`.link`: link the shim and configs into a threestudio checkout.
* :mod:`.common`: argparse types, one-line errors (``UsageError``, ``OneLineParser``,
  ``parse_and_run``) and the tiny checkpoint, shared by every command (input checks and atomic
  writes are in :mod:`threestudio_perpneg.common`).
* :mod:`.quiet`: quiet by default (third-party warnings and loading bars hidden unless ``--verbose``).
"""
