"""mkdocs hooks: the generated reference pages and the result pictures under benchmarks/results/.

* A page holding ``<!-- generated: config-reference -->`` or ``<!-- generated: cli-reference -->``
  gets that marker replaced by :func:`threestudio_perpneg.commands.config_reference.
  config_reference_markdown` (every ``perpneg-*`` ``Config``, read from the adapters' source) or
  :func:`threestudio_perpneg.commands.cli_reference.cli_reference_markdown` (every command's
  ``--help``).
* The PNGs under ``benchmarks/results/`` join the site at the same relative path, so pages show
  them as ``benchmarks/results/...`` without a second copy in ``docs/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package of this checkout, installed or not
    sys.path.insert(0, str(ROOT))

MARKERS = {
    "<!-- generated: config-reference -->": "config",
    "<!-- generated: cli-reference -->": "cli",
}


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        src_uri = path.relative_to(ROOT).as_posix()
        if "/priors/" not in src_uri:
            files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, kind in MARKERS.items():
        if marker not in markdown:
            continue
        if kind == "config":
            from threestudio_perpneg.commands.config_reference import config_reference_markdown

            text = config_reference_markdown()
        else:
            from threestudio_perpneg.commands.cli_reference import cli_reference_markdown

            text = cli_reference_markdown()
        markdown = markdown.replace(marker, text)
    return markdown
