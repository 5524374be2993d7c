"""``python -m threestudio_perpneg.eval.sweep [key=value ...] [-m] [--verbose]``: the Hydra sweep app.

Quiet like ``threestudio-perpneg sweep`` (:mod:`threestudio_perpneg.commands.quiet`); ``--verbose``
is ours, not a Hydra override, and is taken out before Hydra parses the rest.
"""

from __future__ import annotations

import sys

from ...commands.quiet import quiet_third_party
from .app import main

if __name__ == "__main__":
    args = sys.argv[1:]
    quiet_third_party("--verbose" in args)
    sys.exit(main([a for a in args if a != "--verbose"]))
