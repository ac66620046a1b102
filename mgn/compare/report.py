"""The verdict of a comparison: table.md, summary.json and paired.png (the numbers
mgn/compare/significance.py, their layout mgn/compare/tables.py), with what they need beside the results: the
caption-only and CLIP references, the deployed students' costs, the machine.

The deployment costs (FLOPs, batch-1 latency relative to the baseline) are measured on the run folders,
which are large and not committed; on a fresh checkout the table is re-rendered from results.jsonl and the
costs the previous summary.json recorded, so the committed table can be reproduced without training.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from mgn import distributed
from mgn.compare import significance, tables
from mgn.checkpoint.read import load_checkpoint
from mgn.eval.caption_only import caption_only_metrics
from mgn.eval.clip import clip_batches, load_clip, read_prompts
from mgn.compare.arms import Arm
from mgn.compare.plan import IMAGENET_NOTE, STANDIN_NOTE, STANDINS, Options, Setting, standin_weights
from mgn.eval.evaluate import predict_clip, summarize
from mgn.bench.timing import Timer, at_own_size, count_flops, time_latency


def write_verdict(options: Options, arms: dict[str, Arm], settings: dict[str, Setting], rows: list[dict],
                  bench: dict | None = None) -> dict:
    """Summarize `rows` (the plan's results) with the references, costs and the bench (per setting: ceilings,
    pilot), write the verdict; returns it."""
    references = {name: {"caption_only": caption_only_metrics(s.train_shards, s.test_shards)}
                  for name, s in settings.items()}
    previous = read_json(options.out / "summary.json") or {}
    costs = _costs(options, settings, rows, previous)
    clip_latency = costs.pop("clip", {}).get("latency_ratio")
    if options.clip:
        for name, metrics in clip_metrics(options.clip, settings, options.prompts).items():
            references[name]["clip"] = {"model": options.clip, **metrics,
                                        "student_latency_over_clip": clip_latency}
    summary = significance.summarize(rows, arms, list(settings), references, costs, bench)
    standin_settings = [name for name, s in settings.items() if s.init in STANDINS]
    summary["plan"] = {"command": options.command, "pilot_seeds": options.pilot_seeds, "seeds": options.seeds,
                       "max_seeds": options.max_seeds, "ignore_pilot": options.ignore_pilot,
                       "base_config": options.base,
                       "settings": {n: dataclasses.asdict(s) for n, s in settings.items()},
                       "standin": STANDIN_NOTE if standin_settings else None,
                       "machine": machine(), "runs": len(rows),
                       "standin_quality": {init: read_json(standin_weights(options,
                                                                           init).parent / "quality.json")
                                           or (previous.get("plan",
                                                            {}).get("standin_quality") or {}).get(init)
                                           for init in sorted({settings[n].init for n in standin_settings})}}
    return tables.write(summary, options.out, _header(options, summary, rows, standin_settings))


def _costs(options: Options, settings: dict[str, Setting], rows: list[dict], previous: dict) -> dict:
    """Measured on the first setting's students when their run folders are here, else the previous
    verdict's."""
    # deployment costs are timed on the students of the setting with the most arms (the first of those)
    first_setting = max(settings, key=lambda n: len({r["arm"] for r in rows if r["setting"] == n}))
    timed = [r for r in rows if r["setting"] == first_setting]
    if all(Path(r["run_dirs"][-1]).exists() for r in timed):
        return deployment_costs(timed, options.threads, options.clip, options.prompts)
    # results made elsewhere (e.g. the committed table): keep the costs measured beside them
    print(f"MGN compare: the run folders of {first_setting} are not under {options.work}; deployment "
          f"costs are taken from the previous {options.out / 'summary.json'}, not measured again", flush=True)
    return previous_costs(previous, first_setting)


def _header(options: Options, summary: dict, rows: list[dict], standin_settings: list[str]) -> str:
    header = (f"Command: `{options.command}`  \nMachine: {summary['plan']['machine']['description']}; "
              f"train time of all runs: {sum(r['train_seconds'] for r in rows) / 60:.0f} min")
    if standin_settings:
        header += (f"  \nStand-in encoders ({', '.join(standin_settings)} rows): "
                   f"{STANDIN_NOTE.split(': ', 1)[1]}")
        for init, quality in summary["plan"]["standin_quality"].items():
            if quality:
                classes = quality.get("classes", 8)
                header += (f" {init}: {quality['student']['accuracy']:.3f} accuracy on its corpus's held-out "
                           "split "
                           f"({classes} classes, chance {1 / classes:.3f}).")
    imagenet = [name for name, s in summary["plan"]["settings"].items() if s["init"] == "imagenet"]
    if imagenet:
        header += (f"  \nImageNet start ({', '.join(imagenet)} rows): {IMAGENET_NOTE}")
    return header


def clip_metrics(model: str, settings: dict[str, Setting], prompts: str | None = None) -> dict[str, dict]:
    """The CLIP zero-shot baseline on each setting's test shards (no training): the paper's Table I row."""
    clip = load_clip(model, read_prompts(prompts))
    device = distributed.pick_device("auto")
    scored: dict[str, dict] = {}
    out = {}
    for name, setting in settings.items():
        if setting.test_shards not in scored:
            report = summarize(predict_clip(clip, clip_batches(clip, setting.test_shards), device=device),
                               None)
            scored[setting.test_shards] = {k: report["student"][k] for k in significance.METRICS}
        out[name] = scored[setting.test_shards]
    return out


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def previous_costs(summary: dict, setting: str) -> dict:
    """The latency ratio and FLOPs check of each arm, as a previous verdict of `setting` recorded them."""
    arms = summary.get("settings", {}).get(setting, {}).get("arms", {})
    return {arm: {k: item[k] for k in ("latency_ratio", "flops_equal") if k in item} for arm,
            item in arms.items()}


def deployment_costs(rows: list[dict], threads: int, clip: str | None = None,
                     prompts: str | None = None) -> dict:
    """Per arm: the deployed student's FLOPs equal to the baseline's, and its batch-1 latency over the
    baseline's, timed side by side (interleaved rounds) on the lowest seed's students in `rows` (one
    setting's). With `clip`, its image tower is timed in the same rounds (at its own input size):
    costs["clip"]["latency_ratio"] is the baseline student's latency over CLIP's."""
    first = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        first.setdefault(row["arm"], row)
    if "baseline" not in first:
        return {}
    if threads:
        torch.set_num_threads(threads)
    students = {arm: load_checkpoint(row["run_dirs"][-1]).student for arm, row in first.items()}
    size = load_checkpoint(first["baseline"]["run_dirs"][-1]).cfg.model.image_size
    image = torch.randn(1, 3, size, size)
    flops = {arm: count_flops(model, image) for arm, model in students.items()}
    runners = dict(students)
    if clip:
        tower = load_clip(clip, read_prompts(prompts))
        runners["clip"] = at_own_size(tower, tower.image_size, size)
    samples = time_latency(runners, image, Timer(torch.device("cpu")), warmup=5, iters=60, rounds=3)
    median = {arm: float(np.median(ms)) for arm, ms in samples.items()}
    costs = {arm: {"latency_ratio": median[arm] / median["baseline"],
                   "flops_equal": flops[arm] == flops["baseline"]}
             for arm in students}
    if clip:
        costs["clip"] = {"latency_ratio": median["baseline"] / median["clip"]}
    return costs


def machine() -> dict:
    cpus = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"description": f"{platform.processor() or platform.machine()}, {cpus} CPU cores"
                           + (f", {gpu}" if gpu else ", no GPU") + f", torch {torch.__version__}",
            "cpus": cpus, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__}
