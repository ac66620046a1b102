"""results.jsonl (and the Slurm executor's submitted.jsonl): one JSON line per finished cell, appended at once.

Appending one fsynced line per cell is what makes an interrupted table resumable: whatever finished is
on disk, and a line cut by a crash is skipped with a warning (that cell simply runs again).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("mgn")


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:  # a line cut by a crash: the cell simply runs again
                log.warning("MGN compare: %s line %d is not JSON (%s); that cell will run again", path, number, error)
    return rows


def append_result(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
