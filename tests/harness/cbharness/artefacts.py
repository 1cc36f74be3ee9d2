"""What a test saw, kept for a person to read (closing notes, support): with
CARDBRIDGE_ARTEFACTS=DIR set, artefact(name, text) writes DIR/name; without it, nothing.
Artefacts hold outputs only (doctor reports, journal excerpts), never card data or PINs."""
from __future__ import annotations

import os
from pathlib import Path


def artefact(name: str, text: str) -> None:
    where = os.environ.get("CARDBRIDGE_ARTEFACTS")
    if not where:
        return
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text if text.endswith("\n") else text + "\n")
