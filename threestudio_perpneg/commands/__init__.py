"""Command-line entry points (``python -m threestudio_perpneg COMMAND``) and their shared helpers.

* :mod:`.smoke`: CPU smoke run / 2D Perp-Neg SDS playground (its options: :mod:`.smoke_args`).
* :mod:`.generate`: the 2D sampler's command line (``perpneg-2d``).
* :mod:`.link`: link the shim and configs into a threestudio checkout.
* :mod:`.common`: argument helpers shared by every command.
* :mod:`.quiet`: quiet by default (third-party warnings and loading bars hidden unless ``--verbose``).
"""
