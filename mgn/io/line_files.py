"""Files that only ever grow by whole lines: the comparison's results.jsonl and Slurm submitted.jsonl (through
mgn/compare/ledger.py), a rollback's lists of skipped keys (mgn/train/recovery.py).

A crash can cut the last line: the writer stopped before its newline. Appending onto it would glue the next
line to the broken one and lose both, so `append_lines` first moves a cut last line aside, to `<file>.cut`
(kept to look at), leaving the file at its last whole line. Readers (`whole_lines`) leave a cut line out,
so what it recorded counts as not done (a comparison runs that cell again).

A problem line is reported once per process (`report_once`): the comparison runner reads its ledger several
times per command, and a warning on every read buries the one line that matters. Once moved aside, a cut line
is not reported again by later commands either.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("mgn")

_reported: set[tuple[str, int, str]] = set()  # (file, line number, its text) already reported by this process


def report_once(path: Path, number: int, text: str, problem: str) -> None:
    """Warn `<path> line <number> <problem>`, unless this process has reported that line (`text` at
    `number`) already."""
    line = (os.path.abspath(path), number, text)
    if line not in _reported:
        _reported.add(line)
        log.warning("MGN: %s line %d %s", path, number, problem)


def _cut_aside(path: Path) -> Path:
    """Where `append_lines` keeps the cut lines it moved out of `path`."""
    return path.with_name(path.name + ".cut")


def whole_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each line that ends with its newline; a cut last line is reported and left out.
    No file: no lines."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    cut = lines.pop()  # what follows the last newline: '' in a file whose last line is whole
    if cut:
        report_once(path, len(lines) + 1, cut, f"is cut off (its writer stopped mid-line): left out, so "
                                               f"what it records counts as not done; the next line appended "
                                               f"moves it to {_cut_aside(path)}")
    return list(enumerate(lines, 1))


def append_lines(path: Path, lines: Iterable[str], *, durable: bool = False) -> None:
    """Append `lines` (each without its newline), after moving a cut last line aside; with `durable`, on disk
    (fsync) before returning, as a ledger that a resumed run trusts must be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:  # appends go to the end, even after the truncation below
        _move_cut_line_aside(path, f)
        f.write("".join(f"{line}\n" for line in lines).encode("utf-8"))
        f.flush()
        if durable:
            os.fsync(f.fileno())


def _move_cut_line_aside(path: Path, f) -> None:
    """If the open file `f` does not end with a newline, its last line was cut: copy it to `_cut_aside(path)`
    (on disk first, so it is never lost) and truncate `f` to the line before it."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    f.seek(0)
    data = f.read()
    start = data.rfind(b"\n") + 1
    aside = _cut_aside(path)
    with aside.open("ab") as kept:
        kept.write(data[start:] + b"\n")
        kept.flush()
        os.fsync(kept.fileno())
    f.truncate(start)
    report_once(path, data.count(b"\n") + 1, data[start:].decode("utf-8", errors="replace"),
                f"was cut off (its writer stopped mid-line): moved to {aside}, so what it recorded counts as "
                f"not done")
