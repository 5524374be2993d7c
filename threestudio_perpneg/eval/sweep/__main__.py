"""``python -m threestudio_perpneg.eval.sweep [key=value ...] [-m]``: the Hydra sweep app."""

from __future__ import annotations

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
