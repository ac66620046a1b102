"""The demo's published figures, made from a run: its per-epoch table in docs/demo.md and its final line in
README.md are written here, between markers, from the run's own metrics.csv, never by hand.

    rm -rf shards/demo runs && /usr/bin/time -v python train.py 2> time.log   # the demo, as a user runs it
    python docs/demo_figures.py runs/latest --time-log time.log   # write the figures into the docs
    python docs/demo_figures.py runs/latest --check               # do the docs say what this run did?

--check exits 1, naming what differs, when the docs' final student and teacher accuracy are not the run's (the
slow test tests/test_demo.py runs a fresh demo and checks it so). The figures name the machine they were made
on (CPU vendor and torch's CPU capability): floating-point kernels differ between, say, an AMD EPYC and an
AVX-512 Xeon, and the same run ends a point or two apart on them; on another machine the check allows
OTHER_MACHINE_POINTS and says so. Only the figures are written; the prose around them reads them.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_DOC, README = ROOT / "docs" / "demo.md", ROOT / "README.md"
BEGIN, END = "<!-- demo figures: begin (docs/demo_figures.py writes this) -->", "<!-- demo figures: end -->"
COLUMNS = ("accuracy", "precision", "recall", "f1", "auroc", "pr_auc")
ROLES = {"student": "student (image only, deployed)", "teacher": "teacher (image + caption)"}
MACHINE = re.compile(r"<!-- made on: (.+?) -->")
# how far a run on another kind of CPU may end from the published figures (accuracy points, either role)
OTHER_MACHINE_POINTS = 3.0


def this_machine() -> str:
    """'<CPU vendor> <torch CPU capability>', e.g. 'AuthenticAMD AVX2': what decides the kernels' rounding."""
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    vendor = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("vendor_id")), "unknown")
    return f"{vendor} {torch.backends.cpu.get_cpu_capability()}"


def same_machine(published_on: str | None, here: str) -> bool:
    """Whether the figures were made on this kind of machine (a record of the vendor alone matches any
    capability of that vendor)."""
    return published_on is not None and (published_on == here or published_on == here.split(" ")[0])


def published_machine(path: Path) -> str | None:
    found = MACHINE.search(path.read_text().split(BEGIN, 1)[1].split(END, 1)[0])
    return found.group(1) if found else None


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def final(rows: list[dict]) -> dict[str, float]:
    """{role: accuracy} at the run's last evaluation, to three digits as the docs print them."""
    last = max(int(r["step"]) for r in rows)
    return {r["role"]: round(float(r["accuracy"]), 3) for r in rows if int(r["step"]) == last}


def table(rows: list[dict]) -> str:
    lines = ["| step | role | accuracy | precision | recall | F1 | AUROC | PR-AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r['step']} (epoch {r['epoch']})" if r["role"] == "student" else r["step"]
        lines.append(f"| {label} | "
                     f"{ROLES.get(r['role'], r['role']) if r['step'] == rows[0]['step'] else r['role']} | "
                     + " | ".join(f"{float(r[c]):.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def final_line(rows: list[dict]) -> str:
    acc = final(rows)
    return (f"final student (image only, deployed) accuracy **{acc['student']:.3f}**, teacher (image + "
            "caption) "
            f"{acc['teacher']:.3f}, on {rows[-1]['samples']} test samples")


def time_facts(log: Path | None) -> str:
    """'4 min 21 s wall clock, peak memory 1.6 GiB' from a `/usr/bin/time -v` log, or '' without one."""
    if log is None:
        return ""
    text = log.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    minutes = int(wall.group(1) or 0) * 60 + int(wall.group(2))
    return (f"; {minutes} min {round(float(wall.group(3)))} s wall clock, peak memory "
            f"{int(rss.group(1)) / 2**20:.1f} GiB (maximum resident set size {int(rss.group(1)):,} kB)")


def replace_block(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to write into")
    head, rest = doc.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")


def published(path: Path) -> dict[str, float]:
    """{role: accuracy} the docs' figures block says the demo ends with."""
    block = path.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    found = re.search(r"final student \(image only, deployed\) accuracy \*\*([\d.]+)\*\*, teacher \(image \+ "
                      r"caption\) ([\d.]+)", block)
    return {"student": float(found.group(1)), "teacher": float(found.group(2))} if found else {}


def check(rows: list[dict]) -> int:
    """0 when every doc's figures are the run's: exactly on the machine they were made on, within
    OTHER_MACHINE_POINTS elsewhere (said in the output); 1, naming what differs, otherwise."""
    here, ran, wrong = this_machine(), final(rows), []
    for path in (README, DEMO_DOC):
        said, made_on = published(path), published_machine(path)
        if same_machine(made_on, here):
            if said != ran:
                wrong.append(f"{path.relative_to(ROOT)} says {said}, the run ended with {ran}")
        elif set(said) != set(ran) or any(abs(said[r] - ran[r]) * 100 > OTHER_MACHINE_POINTS for r in said):
            wrong.append(f"{path.relative_to(ROOT)} says {said} (made on {made_on}), the run ended with "
                         f"{ran} on {here}: more than {OTHER_MACHINE_POINTS} points apart")
        else:
            print(f"{path.relative_to(ROOT)}: made on {made_on}, this machine is {here}; floating-point "
                  f"kernels differ, so the run ({ran}) was compared within {OTHER_MACHINE_POINTS} points of "
                  f"{said}, not exactly")
    print("\n".join(wrong) or f"the docs say what the run did: {ran}")
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the demo's run folder, e.g. runs/latest")
    parser.add_argument("--time-log", type=Path, default=None, help="`/usr/bin/time -v` output of the run")
    parser.add_argument("--check", action="store_true", help="compare the docs with the run instead of "
                                                             "writing")
    args = parser.parse_args(argv)
    rows = read_metrics(args.run)
    if args.check:
        return check(rows)
    run_line = f"{final_line(rows)}{time_facts(args.time_log)}.\n<!-- made on: {this_machine()} -->"
    replace_block(README, run_line)
    replace_block(DEMO_DOC, f"{run_line}\n\n{table(rows)}")
    print(f"wrote the demo's figures into {README.relative_to(ROOT)} and {DEMO_DOC.relative_to(ROOT)}: "
          f"{final(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
