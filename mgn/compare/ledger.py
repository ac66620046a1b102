"""results.jsonl (and the Slurm executor's submitted.jsonl): one JSON line per finished cell, appended at
once.

Appending one fsynced line per cell is what makes an interrupted table resumable: whatever finished is
on disk. A line cut by a crash is left out (that cell simply runs again) and moved aside by the next append,
so the row after it is never glued onto it (mgn/io/line_files.py); each problem line is reported once.
"""
from __future__ import annotations

import json
from pathlib import Path

from mgn.io.line_files import append_lines, report_once, whole_lines


def read_results(path: Path) -> list[dict]:
    """The rows of every whole JSON line of `path` (none when it does not exist yet)."""
    rows = []
    for number, line in whole_lines(path):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                report_once(path, number, line, f"is not JSON ({error}): left out, so that cell counts as "
                                                f"not done and runs again; delete the line to silence this")
    return rows


def append_result(path: Path, row: dict) -> None:
    append_lines(path, [json.dumps(row)], durable=True)
