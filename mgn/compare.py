"""The comparison runner: does caption guidance give a better image-only student than plain fine-tuning?

    plan(options)        -> [Cell]     settings (data size x initialisation) x arms x seeds
    prepare_data(...)                  synthetic shards (scarce and plentiful train, one decorrelated test set)
    prepare_standin(...)               a stand-in pretrained image encoder, trained image-only on a separate task
    run_cell(cell)       -> row        train the arm's stages through mgn.train.run, evaluate the final student
    run(options)                       everything `python compare.py` does: plan, estimate, cells, verdict

A cell is one (setting, arm, seed). For a seed, every arm starts from the same image encoder and head
(mgn/objectives.py builds the student first) and reads the same samples in the same order (the loader
is seeded by train.seed alone), so arms are compared pairwise, seed by seed (mgn/verdict.py).
Locally, cells run one after another, each in a fresh `python -m mgn.compare --run-cell` process with a
fixed thread count; with --slurm each cell is an ordinary multi-GPU training job submitted with submitit.
Every finished cell is appended to results.jsonl at once; a re-run skips the cells found there (same
config fingerprint), so an interrupted table resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mgn import verdict
from mgn.caption_only import caption_only_metrics
from mgn.config import PRESETS, Config, preset_config

log = logging.getLogger("mgn")

ARMS_FILE = Path(__file__).with_name("arms.toml")
SHARD_SIZE = 100  # synthetic samples per shard: data sizes are whole shards
FALLBACK_RATE = {True: 0.0125, False: 0.009}  # s per training sample, captions or not: MobileOne-S0, 64 px, 2 cores
STANDIN_NOTE = ("STAND-IN: no ImageNet weights can be downloaded here; 'standin' is a MobileOne pretrained by this "
                "runner, image-only, on a separate synthetic corpus (another seed, 8-class scene x splat-quadrant "
                "target, no moderation label). It plays the role of the paper's ImageNet initialisation.")


# --- arms -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    overrides: dict  # {section: {field: value}}
    epochs_share: float = 1.0


@dataclass(frozen=True)
class Arm:
    name: str
    about: str
    stages: tuple[Stage, ...]


def load_arms(path: str | Path | None = None) -> dict[str, Arm]:
    """The runner's arms (mgn/arms.toml), plus or overridden by the arms of `path` (same format)."""
    tables = tomllib.loads(ARMS_FILE.read_text())
    if path:
        tables |= tomllib.loads(Path(path).read_text())
    arms = {}
    for name, table in tables.items():
        table = dict(table)
        about = table.pop("about", "")
        raw_stages = table.pop("stages", None) or [table]
        stages = []
        for raw in raw_stages:
            raw = dict(raw)
            share = float(raw.pop("epochs_share", 1.0))
            try:
                preset_config("tiny", raw)  # unknown sections, fields and values fail here
            except (ValueError, TypeError) as error:
                raise ValueError(f"arm {name!r} ({path or ARMS_FILE}): {error}") from error
            stages.append(Stage(overrides=raw, epochs_share=share))
        if abs(sum(s.epochs_share for s in stages) - 1.0) > 1e-6:
            raise ValueError(f"arm {name!r}: the stages' epochs_share must add up to 1 (the arm's whole budget)")
        arms[name] = Arm(name, about, tuple(stages))
    if "baseline" not in arms:
        raise ValueError("the arms must include 'baseline': every other arm is compared with it")
    return arms


# --- the plan ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """Where the arms are compared: a training set and an initialisation of the image encoder."""
    data: str  # scarce | plentiful | yours
    init: str  # scratch | standin | pretrained
    train_shards: str
    test_shards: str
    train_samples: int  # for the estimate
    image_pretrained: str = ""  # model.image_pretrained for every arm of this setting

    @property
    def name(self) -> str:
        return f"{self.data}/{self.init}"


@dataclass(frozen=True)
class Cell:
    setting: Setting
    arm: Arm
    seed: int
    base: dict  # the comparison's base config, as a dict (the same for every cell)

    @property
    def key(self) -> str:
        return f"{self.setting.name}/{self.arm.name}/seed{self.seed}"

    def stage_configs(self, work: Path) -> list[Config]:
        """One config per stage: base + arm overrides, this cell's seed, data, folder and epoch share."""
        configs = []
        total_epochs = self.base["train"]["epochs"]
        ends, share = [], 0.0  # each stage's last epoch of the arm's budget: the stages add up to it exactly
        for stage in self.arm.stages:
            share += stage.epochs_share
            ends.append(round(total_epochs * share))
        ends[-1] = total_epochs
        epochs = [end - start for start, end in zip([0, *ends], ends)]
        if min(epochs) < 1:
            raise ValueError(f"arm {self.arm.name!r}: {total_epochs} epochs cannot be split into its "
                             f"{len(epochs)} stages (shares {[s.epochs_share for s in self.arm.stages]})")
        folder = work / "runs" / self.setting.name.replace("/", "-")
        for index, stage in enumerate(self.arm.stages):
            raw = json.loads(json.dumps(self.base))
            for section, values in stage.overrides.items():
                raw[section].update(values)
            suffix = f"-stage{index + 1}" if len(self.arm.stages) > 1 else ""
            raw["data"].update(train_shards=self.setting.train_shards, test_shards=self.setting.test_shards,
                               synthetic_samples=0)
            raw["model"]["image_pretrained"] = self.setting.image_pretrained
            raw["train"].update(seed=self.seed, output_dir=str(folder), run_name=f"{self.arm.name}-s{self.seed}{suffix}",
                                epochs=epochs[index], resume="auto")
            if index > 0:
                raw["train"]["init_from"] = str(configs[-1].run_dir)
            configs.append(Config.from_dict(raw))
        return configs

    def fingerprint(self, work: Path) -> str:
        """Changes whenever anything that shapes the result changes (not the folders it writes to)."""
        configs = []
        for cfg in self.stage_configs(work):
            raw = cfg.to_dict()
            for name in ("output_dir", "run_name", "init_from", "resume"):
                raw["train"].pop(name)
            configs.append(raw)
        return hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Options:
    """Everything `python compare.py` takes (compare.py documents each flag)."""
    out: Path = Path("benchmarks/results/compare")  # verdict: results.jsonl, summary.json, table.md, paired.png
    work: Path = Path("runs/compare")  # runs, data, stand-in, logs: large, not for version control
    arms: list[str] | None = None  # None: the default plan's arms
    arms_file: str | None = None
    seeds: int = 5
    scarce: int = 600  # training samples of the scarce setting
    plentiful: int = 1500
    test: int = 1000
    train_shards: str | None = None  # the user's own data, instead of the synthetic sets
    test_shards: str | None = None
    pretrained: str = "standin"  # standin | none | hub | a weights file
    all_settings_all_arms: bool = False  # every arm in every setting (the variants' full table)
    settings: list[str] | None = None  # run only these settings, in this order (None: all of the plan)
    threads: int = 0  # torch threads per local cell (0: all visible CPUs)
    slurm: bool = False
    slurm_args: dict = field(default_factory=dict)  # nodes, gpus_per_node, partition, time, cpus_per_task
    base: dict = field(default_factory=lambda: preset_config("compare").to_dict())  # every arm's starting config
    dry_run: bool = False
    clip: str | None = None  # a CLIP model folder: adds the zero-shot reference row
    prompts: str | None = None  # its prompt file (mgn/clip.py)
    command: str = "python compare.py"  # as typed, for the verdict's header


DEFAULT_ARMS = ("baseline", "guided", "guided-unfrozen", "attend-fusion", "no-student-term")
REDUCED_ARMS = ("baseline", "guided")  # what the plentiful and pretrained settings run by default


def plan(options: Options, arms: dict[str, Arm], data: dict[str, Setting]) -> list[Cell]:
    """The cells: all chosen arms in the first setting, the reduced set elsewhere (unless asked for all)."""
    chosen = list(arms) if options.arms == ["all"] else options.arms or [a for a in DEFAULT_ARMS if a in arms]
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {sorted(arms)} (mgn/arms.toml, --arms-file)")
    if "baseline" not in chosen:
        chosen = ["baseline", *chosen]
    base = options.base
    cells = []
    for index, setting in enumerate(data.values()):
        names = chosen if index == 0 or options.all_settings_all_arms else [a for a in chosen if a in REDUCED_ARMS]
        for seed in range(options.seeds):
            cells += [Cell(setting, arms[name], seed, base) for name in names]
    return cells


# --- data and the stand-in encoder ------------------------------------------------------------------------

def settings_for(options: Options) -> dict[str, Setting]:
    """The settings of the plan, keyed by name; nothing is written (prepare() writes what they need)."""
    if options.train_shards or options.test_shards:
        if not (options.train_shards and options.test_shards):
            raise ValueError("--train-shards and --test-shards go together")
        from mgn.data import expand_shards, read_sizes  # noqa: PLC0415

        sets = {"yours": (options.train_shards, options.test_shards,
                          sum(read_sizes(expand_shards(options.train_shards)).values()))}
    else:
        for name in ("scarce", "plentiful"):
            if getattr(options, name) % SHARD_SIZE or getattr(options, name) <= 0:
                raise ValueError(f"--{name} {getattr(options, name)}: use a positive multiple of {SHARD_SIZE} "
                                 f"(whole shards)")
        if options.scarce > options.plentiful:
            raise ValueError(f"--scarce {options.scarce} is more than --plentiful {options.plentiful}")
        out = synthetic_dir(options)
        test = str(out / "test-*.tar")
        sets = {"scarce": (str(out / f"train-{{000000..{options.scarce // SHARD_SIZE - 1:06d}}}.tar"), test,
                           options.scarce),
                "plentiful": (str(out / "train-*.tar"), test, options.plentiful)}
    settings = [Setting(name, "scratch", *paths) for name, paths in sets.items()]
    if options.pretrained != "none":
        init, weights = (("standin", str(standin_weights(options))) if options.pretrained == "standin"
                         else ("pretrained", options.pretrained))
        settings += [Setting(name, init, *paths, image_pretrained=weights) for name, paths in sets.items()]
    return {s.name: s for s in settings}


def choose_settings(settings: dict[str, Setting], names: list[str] | None) -> dict[str, Setting]:
    """The settings named by --settings, in that order: the most telling setting can run first, and a long
    table can be finished one setting per session. Without names, the default plan: every data size from
    scratch, and the pretrained start on the first (scarce) data only, where a pretrained encoder matters
    most; the pretrained start on the other sizes (e.g. plentiful/standin) runs when named."""
    if names is None:
        first_data = next(iter(settings.values())).data
        return {n: s for n, s in settings.items() if s.init == "scratch" or s.data == first_data}
    unknown = [n for n in names if n not in settings]
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; this plan has {list(settings)}")
    return {n: settings[n] for n in names}


def prepare(pending: list[Cell], options: Options) -> None:
    """Write the synthetic shards (the caption-only reference reads them too) and, if a run still to do starts
    from it, train the stand-in encoder; both only when missing."""
    if not options.train_shards:
        prepare_data(options)
    if any(c.setting.init == "standin" for c in pending):
        prepare_standin(options)


def synthetic_dir(options: Options) -> Path:
    return options.work / "data" / f"synthetic-{options.scarce}-{options.plentiful}-{options.test}"


def prepare_data(options: Options) -> None:
    """One synthetic set: `plentiful` train samples (the scarce set is its first shards) and one test set
    whose spurious badge is uncorrelated with the label (the generator's default test split)."""
    out = synthetic_dir(options)
    if (out / "sizes.json").exists():
        return
    from mgn.shards import write_synthetic  # noqa: PLC0415

    total = options.plentiful + options.test
    shutil.rmtree(out, ignore_errors=True)
    log.info("MGN compare: writing %d synthetic samples to %s", total, out)
    write_synthetic(out, samples=total, image_size=PRESETS["compare"]["model"]["image_size"], seed=0,
                    max_samples=SHARD_SIZE, test_fraction=options.test / total)


def standin_config(options: Options) -> Config:
    """Image-only pretraining on a separate corpus: seed 1, no decoys, the 8-class scene x quadrant target."""
    folder = options.work / "standin"
    return preset_config("compare", {
        "objective": {"name": "baseline"}, "model": {"num_classes": 8},
        "data": {"train_shards": str(folder / "data" / "train-*.tar"), "test_shards": str(folder / "data" / "test-*.tar"),
                 "synthetic_samples": 0},
        "train": {"output_dir": str(folder), "run_name": "pretrain", "resume": "auto", "seed": 0}})


def standin_weights(options: Options) -> Path:
    return options.work / "standin" / "encoder.safetensors"


def prepare_standin(options: Options) -> None:
    """Train (once, cached) the stand-in encoder and write its weights as a timm-loadable safetensors file."""
    cfg = standin_config(options)
    weights = standin_weights(options)
    if weights.exists():
        return
    data = Path(cfg.data.train_shards).parent
    if not (data / "sizes.json").exists():
        from mgn.shards import write_synthetic  # noqa: PLC0415

        shutil.rmtree(data, ignore_errors=True)
        log.info("MGN compare: writing the stand-in's pretraining corpus to %s", data)
        write_synthetic(data, samples=options.plentiful + 200, image_size=cfg.model.image_size, seed=1,
                        max_samples=SHARD_SIZE, test_fraction=200 / (options.plentiful + 200), decoys=0,
                        target="scene_quadrant")
    log.info("MGN compare: pretraining the stand-in image encoder (%s)", cfg.run_dir)
    _run_process(["--train-config", json.dumps(cfg.to_dict())], cfg.run_dir.parent / "pretrain.log", options.threads)
    from mgn.checkpoint import load_checkpoint  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    encoder = load_checkpoint(cfg.run_dir).unfused_student.encoder
    quality = evaluate_run(cfg.run_dir, None)  # how much it learned, on its own held-out corpus (8 classes)
    (weights.parent / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(weights))


# --- one cell ---------------------------------------------------------------------------------------------

def run_cell(spec: dict) -> dict | None:
    """Train every stage of a cell, then (rank 0) evaluate its final student and teacher. Every rank calls it.

    A stage whose run folder holds a finished run with this config is skipped; an interrupted one resumes
    from its checkpoint (`train.resume auto`), as a requeued Slurm job does. Returns the result row on
    rank 0, None elsewhere, {"preempted": ...} when a stage stopped for a signal.
    """
    from mgn import distributed  # noqa: PLC0415
    from mgn.train import run  # noqa: PLC0415

    configs = [Config.from_dict(raw) for raw in spec["configs"]]
    train_seconds = 0.0
    for cfg in configs:
        if _finished(cfg):
            train_seconds += json.loads((cfg.run_dir / "summary.json").read_text()).get("train_seconds", 0.0)
            continue
        if distributed.detect_world().rank == 0:
            _set_aside_if_stale(cfg)
        distributed.barrier()
        summary = run(cfg, keep_process_group=True)
        if summary.get("preempted"):
            return summary
        train_seconds += summary["train_seconds"]
    distributed.shutdown()
    if distributed.detect_world().rank != 0:
        return None
    start = time.perf_counter()
    guided = [c for c in configs if c.uses_captions]
    row = {"key": spec["key"], "setting": spec["setting"], "arm": spec["arm"], "seed": spec["seed"],
           "fingerprint": spec["fingerprint"], "train_seconds": round(train_seconds, 2),
           **evaluate_run(configs[-1].run_dir, guided[-1].run_dir if guided else None),
           "start": json.loads((configs[0].run_dir / "start.json").read_text()),
           "run_dirs": [str(c.run_dir) for c in configs], "code": code_version()}
    row["eval_seconds"] = round(time.perf_counter() - start, 2)
    return row


def _set_aside_if_stale(cfg: Config) -> None:
    """A stage folder written with another config (the user changed a setting) must not be resumed: it is
    renamed `<name>.stale-<time>`, kept for inspection, and the stage starts afresh."""
    if _saved_config_matches(cfg) is False:
        aside = cfg.run_dir.with_name(f"{cfg.run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.run_dir.rename(aside)
        log.warning("MGN compare: %s was trained with another config; moved to %s, training this stage afresh",
                    cfg.run_dir, aside)


def _saved_config_matches(cfg: Config) -> bool | None:
    """Whether the stage folder was written with this very config; None when it holds no config yet."""
    saved = cfg.run_dir / "config.json"
    if not saved.exists():
        return None
    try:
        return Config.load(saved) == cfg
    except (OSError, ValueError):
        return False


def _finished(cfg: Config) -> bool:
    """A stage already done with this very config (a re-run skips it)."""
    try:
        done = json.loads((cfg.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return not done.get("preempted") and _saved_config_matches(cfg) is True


def evaluate_run(student_run: Path, teacher_run: Path | None) -> dict:
    """The final checkpoint's student (fused, as deployed) on the test shards; the guided teacher and its
    caption reliance from `teacher_run` (the last stage that read captions), if any."""
    import torch  # noqa: PLC0415

    from mgn.checkpoint import load_checkpoint  # noqa: PLC0415
    from mgn.evaluate import caption_reliance, predict, summarize, test_batches  # noqa: PLC0415

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = verdict.METRICS
    ckpt = load_checkpoint(student_run)
    report = summarize(predict(ckpt, test_batches(ckpt.cfg, ckpt.cfg.data, False, batch_size=256), device=device),
                       target_precision=None)
    row = {"test_samples": report["samples"], "student": {k: report["student"][k] for k in metrics}}
    if teacher_run is not None:
        guided = load_checkpoint(teacher_run, teacher=True)
        batches = test_batches(guided.cfg, guided.cfg.data, True, batch_size=256)
        report = summarize(predict(guided, batches, device=device, teacher=True), target_precision=None)
        row["teacher"] = {k: report["teacher"][k] for k in metrics}
        row["reliance"] = caption_reliance(guided.teacher, batches, device=device)
    return row


def code_version() -> str:
    """The commit the runs were made with (and '+dirty' with uncommitted changes), for results.jsonl."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def main_cell(spec_file: str, result_file: str) -> int:
    """`python -m mgn.compare --run-cell SPEC RESULT`: one cell in this process (what the runner spawns)."""
    spec = json.loads(Path(spec_file).read_text())
    row = run_cell(spec)
    if row is not None and not row.get("preempted"):
        tmp = Path(result_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(row) + "\n")
        tmp.replace(result_file)
    return 0


def main_train(raw: str) -> int:
    """`python -m mgn.compare --train-config JSON`: one plain training run (the stand-in's pretraining)."""
    from mgn.train import run  # noqa: PLC0415

    run(Config.from_dict(json.loads(raw)))
    return 0


# --- running the plan -------------------------------------------------------------------------------------

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


def cell_spec(cell: Cell, work: Path) -> dict:
    return {"key": cell.key, "setting": cell.setting.name, "arm": cell.arm.name, "seed": cell.seed,
            "fingerprint": cell.fingerprint(work), "configs": [c.to_dict() for c in cell.stage_configs(work)]}


def run(options: Options) -> dict:
    """Plan, estimate, run the missing cells, write the verdict. Returns the summary."""
    arms = load_arms(options.arms_file)
    settings = choose_settings(settings_for(options), options.settings)
    cells = plan(options, arms, settings)
    results_file = options.out / "results.jsonl"
    done = {(r["key"], r["fingerprint"]) for r in read_results(results_file)}
    pending = [c for c in cells if (c.key, c.fingerprint(options.work)) not in done]
    print(describe_plan(options, cells, pending, settings), flush=True)
    if options.dry_run:
        return {}
    prepare(pending, options)
    if pending:
        if options.slurm:
            _run_on_slurm(pending, options, results_file)
        else:
            _run_locally(pending, options, results_file)
    wanted = {(c.key, c.fingerprint(options.work)) for c in cells}
    rows = [r for r in read_results(results_file) if (r["key"], r["fingerprint"]) in wanted]
    references = {name: {"caption_only": caption_only_metrics(s.train_shards, s.test_shards)}
                  for name, s in settings.items()}
    previous = _read_json(options.out / "summary.json") or {}
    first_setting = next(iter(settings))  # deployment costs are timed on its students
    timed = [r for r in rows if r["setting"] == first_setting]
    if all(Path(r["run_dirs"][-1]).exists() for r in timed):
        costs = deployment_costs(timed, options.threads, options.clip, options.prompts)
    else:  # results made elsewhere (e.g. the committed table): keep the costs measured beside them
        costs = _previous_costs(previous, first_setting)
        print(f"MGN compare: the run folders of {first_setting} are not under {options.work}; deployment "
              f"costs are taken from the previous {options.out / 'summary.json'}, not measured again", flush=True)
    clip_latency = costs.pop("clip", {}).get("latency_ratio")
    if options.clip:
        for name, metrics in clip_metrics(options.clip, settings, options.prompts).items():
            references[name]["clip"] = {"model": options.clip, **metrics, "student_latency_over_clip": clip_latency}
    summary = verdict.summarize(rows, arms, list(settings), references, costs)
    standin_settings = [name for name, s in settings.items() if s.init == "standin"]
    summary["plan"] = {"command": options.command, "seeds": options.seeds, "base_config": options.base,
                       "settings": {n: dataclasses.asdict(s) for n, s in settings.items()},
                       "standin": STANDIN_NOTE if standin_settings else None,
                       "machine": machine(), "runs": len(rows),
                       "standin_quality": _read_json(standin_weights(options).parent / "quality.json")
                       or previous.get("plan", {}).get("standin_quality")}
    header = (f"Command: `{options.command}`  \nMachine: {summary['plan']['machine']['description']}; "
              f"train time of all runs: {sum(r['train_seconds'] for r in rows) / 60:.0f} min")
    quality = summary["plan"]["standin_quality"]
    if quality and standin_settings:
        header += (f"  \nStand-in encoder ({', '.join(standin_settings)} rows): {STANDIN_NOTE.split(': ', 1)[1]} "
                   f"On that corpus's held-out split its 8-class accuracy is "
                   f"{quality['student']['accuracy']:.3f} (chance 0.125).")
    return verdict.write(summary, options.out, header)


def clip_metrics(model: str, settings: dict[str, Setting], prompts: str | None = None) -> dict[str, dict]:
    """The CLIP zero-shot baseline on each setting's test shards (no training): the paper's Table I row."""
    import torch  # noqa: PLC0415

    from mgn.clip import clip_batches, load_clip, read_prompts  # noqa: PLC0415
    from mgn.evaluate import predict_clip, summarize  # noqa: PLC0415

    clip = load_clip(model, read_prompts(prompts))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scored: dict[str, dict] = {}
    out = {}
    for name, setting in settings.items():
        if setting.test_shards not in scored:
            report = summarize(predict_clip(clip, clip_batches(clip, setting.test_shards), device=device), None)
            scored[setting.test_shards] = {k: report["student"][k] for k in verdict.METRICS}
        out[name] = scored[setting.test_shards]
    return out


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _previous_costs(summary: dict, setting: str) -> dict:
    """The latency ratio and FLOPs check of each arm, as a previous verdict of `setting` recorded them."""
    arms = summary.get("settings", {}).get(setting, {}).get("arms", {})
    return {arm: {k: item[k] for k in ("latency_ratio", "flops_equal") if k in item} for arm, item in arms.items()}


def deployment_costs(rows: list[dict], threads: int, clip: str | None = None, prompts: str | None = None) -> dict:
    """Per arm: the deployed student's FLOPs equal to the baseline's, and its batch-1 latency over the baseline's,
    timed side by side (interleaved rounds) on the lowest seed's students in `rows` (one setting's). With `clip`,
    its image tower is timed in the same rounds (at its own input size): costs["clip"]["latency_ratio"] is the
    baseline student's latency over CLIP's."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from mgn.benchmark import Timer, count_flops, time_latency  # noqa: PLC0415
    from mgn.checkpoint import load_checkpoint  # noqa: PLC0415

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
        from mgn.benchmark import at_own_size  # noqa: PLC0415
        from mgn.clip import load_clip, read_prompts  # noqa: PLC0415

        tower = load_clip(clip, read_prompts(prompts))
        runners["clip"] = at_own_size(tower, tower.image_size, size)
    samples = time_latency(runners, image, Timer(torch.device("cpu")), warmup=5, iters=60, rounds=3)
    median = {arm: float(np.median(ms)) for arm, ms in samples.items()}
    costs = {arm: {"latency_ratio": median[arm] / median["baseline"], "flops_equal": flops[arm] == flops["baseline"]}
             for arm in students}
    if clip:
        costs["clip"] = {"latency_ratio": median["baseline"] / median["clip"]}
    return costs


def machine() -> dict:
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    cpus = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"description": f"{platform.processor() or platform.machine()}, {cpus} CPU cores"
                           + (f", {gpu}" if gpu else ", no GPU") + f", torch {torch.__version__}",
            "cpus": cpus, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__}


def describe_plan(options: Options, cells: list[Cell], pending: list[Cell], settings: dict[str, Setting]) -> str:
    base = options.base
    lines = [f"MGN compare: {len(cells)} runs ({len(cells) - len(pending)} already in {options.out / 'results.jsonl'}), "
             f"{options.seeds} paired seeds, {base['train']['epochs']} epochs per arm, "
             f"{base['model']['image_model']} at {base['model']['image_size']} px"]
    for setting in settings.values():
        names = sorted({c.arm.name for c in cells if c.setting == setting})
        init = setting.image_pretrained or "random init"
        lines.append(f"  {setting.name:<22} train {setting.train_shards}  init {init}  arms {', '.join(names)}")
    if any(s.init == "standin" for s in settings.values()):
        lines.append(f"  {STANDIN_NOTE}")
    if pending:
        standin = any(s.init == "standin" for s in settings.values()) and not standin_weights(options).exists()
        seconds = estimate(pending, options) + (standin_seconds(options) if standin else 0)
        lines.append(f"  estimate: {seconds / 60:.0f} min for the {len(pending)} runs still to do"
                     f"{' and the stand-in pretraining' if standin else ''} "
                     f"({'Slurm jobs, run in parallel as the cluster allows' if options.slurm else 'one after another'})")
    return "\n".join(lines)


def estimate(cells: list[Cell], options: Options) -> float:
    """Seconds: training samples x epochs at the rate measured in results.jsonl (or a built-in rate for this
    project's 2-core reference machine), plus a per-run overhead; guided arms cost more per sample."""
    per_sample = {}
    for row in read_results(options.out / "results.jsonl"):
        per_sample.setdefault(row["arm"], []).append(row["train_seconds"] / row["train_samples_seen"])
    total = 0.0
    for cell in cells:
        configs = cell.stage_configs(options.work)
        rate = per_sample.get(cell.arm.name)
        total += (samples_seen(cell, options.work) * (sum(rate) / len(rate) if rate else
                                                       FALLBACK_RATE[configs[0].uses_captions]) + 20 * len(configs))
    return total


def standin_seconds(options: Options) -> float:
    """The stand-in's pretraining: its corpus x epochs at the baseline's built-in rate, plus writing the corpus."""
    return options.plentiful * standin_config(options).train.epochs * FALLBACK_RATE[False] + 60


def samples_seen(cell: Cell, work: Path) -> int:
    return sum(cell.setting.train_samples * c.train.epochs for c in cell.stage_configs(work))


def _run_process(args: list[str], log_file: Path, threads: int) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                     "SLURM_"))}
    threads = threads or len(os.sched_getaffinity(0))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with log_file.open("w") as out:
        result = subprocess.run([sys.executable, "-m", "mgn.compare", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"exit status {result.returncode}; see {log_file}")


def _run_locally(pending: list[Cell], options: Options, results_file: Path) -> None:
    started = time.perf_counter()
    failures = []
    for number, cell in enumerate(pending, 1):
        spec = cell_spec(cell, options.work)
        stem = options.work / "cells" / cell.key.replace("/", "-")
        stem.parent.mkdir(parents=True, exist_ok=True)
        spec_file, result_file = stem.with_suffix(".json"), stem.with_suffix(".result.json")
        spec_file.write_text(json.dumps(spec))
        result_file.unlink(missing_ok=True)
        try:
            _run_process(["--run-cell", str(spec_file), str(result_file)], stem.with_suffix(".log"), options.threads)
            row = json.loads(result_file.read_text())
        except (RuntimeError, OSError, ValueError) as error:
            failures.append(cell.key)
            print(f"MGN compare: [{number}/{len(pending)}] {cell.key} FAILED: {error}", flush=True)
            continue
        row["train_samples_seen"] = samples_seen(cell, options.work)
        append_result(results_file, row)
        print(progress_line(number, len(pending), row, time.perf_counter() - started), flush=True)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed ({', '.join(failures[:5])}); their logs are in "
                           f"{options.work / 'cells'}; the others are saved: re-run the same command to retry")


def progress_line(number: int, total: int, row: dict, elapsed: float) -> str:
    teacher = f", teacher {row['teacher']['accuracy']:.3f}" if "teacher" in row else ""
    left = elapsed / number * (total - number)
    return (f"MGN compare: [{number}/{total}] {row['key']}: student acc {row['student']['accuracy']:.3f} "
            f"AUROC {row['student']['auroc']:.3f}{teacher} | train {row['train_seconds']:.0f} s | "
            f"elapsed {elapsed / 60:.1f} min, about {left / 60:.0f} min left")


def _run_on_slurm(pending: list[Cell], options: Options, results_file: Path) -> None:
    """One submitit job per cell (every stage and the evaluation inside it); rows appended as jobs finish."""
    import submitit  # noqa: PLC0415

    ledger = options.work / "slurm" / "submitted.jsonl"  # a runner started again re-attaches to its jobs
    submitted = {(r["key"], r["fingerprint"]): r for r in read_results(ledger)}
    jobs, attached = {}, 0
    for cell in pending:
        spec = cell_spec(cell, options.work)
        record = submitted.get((cell.key, spec["fingerprint"]))
        if record:
            job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"], tasks=tuple(range(record["tasks"])))
            if job.state not in SLURM_FAILED_STATES:  # queued, running, or done with its result on disk
                jobs[job] = cell
                attached += 1
                continue
        executor = _slurm_executor(options, cell)
        job = executor.submit(CellJob(spec))
        append_result(ledger, {"key": cell.key, "fingerprint": spec["fingerprint"], "job_id": job.job_id,
                               "folder": str(job.paths.folder), "tasks": options.slurm_args.get("nodes", 1)
                               * max(options.slurm_args.get("gpus_per_node", 1), 1)})
        jobs[job] = cell
    print(f"MGN compare: {len(jobs) - attached} Slurm jobs submitted, {attached} already queued or done re-attached "
          f"({', '.join(j.job_id for j in list(jobs)[:5])}{'...' if len(jobs) > 5 else ''})", flush=True)
    started, failures = time.perf_counter(), []
    for number, job in enumerate(submitit.helpers.as_completed(list(jobs)), 1):
        cell = jobs[job]
        try:
            row = next(r for r in job.results() if r)
        except Exception as error:  # noqa: BLE001 - a failed job is reported, the others continue
            failures.append(cell.key)
            print(f"MGN compare: [{number}/{len(jobs)}] {cell.key} FAILED (job {job.job_id}): {error}", flush=True)
            continue
        row["train_samples_seen"] = samples_seen(cell, options.work)
        append_result(results_file, row)
        print(progress_line(number, len(jobs), row, time.perf_counter() - started), flush=True)
    if failures:
        raise RuntimeError(f"{len(failures)} Slurm job(s) failed: {', '.join(failures[:5])}; their logs are under "
                           f"{options.work / 'slurm'}; re-run the same command to retry them")


def _slurm_executor(options: Options, cell: Cell):
    import submitit  # noqa: PLC0415

    s = {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 8, "time": 240, "partition": None, **options.slurm_args}
    tasks = max(s["gpus_per_node"], 1)
    executor = submitit.AutoExecutor(folder=options.work / "slurm" / cell.key.replace("/", "-"))
    executor.update_parameters(
        name=f"mgn-compare-{cell.arm.name}-s{cell.seed}", nodes=s["nodes"], tasks_per_node=tasks,
        cpus_per_task=s["cpus_per_task"], timeout_min=s["time"], slurm_partition=s["partition"],
        slurm_signal_delay_s=min(300, s["time"] * 30), slurm_additional_parameters={"requeue": True},
        slurm_srun_args=["--kill-on-bad-exit=1"],
        slurm_setup=[f"export PYTHONPATH={Path(__file__).resolve().parents[1]}${{PYTHONPATH:+:$PYTHONPATH}}",
                     f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{s['cpus_per_task']}}}"])
    if s["gpus_per_node"]:
        executor.update_parameters(gpus_per_node=s["gpus_per_node"])
    return executor


SLURM_FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                       "UNKNOWN")


class CellJob:
    """One cell as a Slurm job: every rank trains the stages; rank 0 evaluates and returns the row.

    On a time-limit or preemption signal the stage saves, rank 0 requeues the job, and the restart
    resumes the stage from its checkpoint (run_cell always passes train.resume auto).
    """

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self) -> dict | None:
        import submitit  # noqa: PLC0415

        from mgn import preemption  # noqa: PLC0415

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        row = run_cell(self.spec)
        if row is not None and row.get("preempted"):
            if row.get("requeue") and row.get("rank", 0) == 0:
                preemption.requeue_slurm_job()
            raise SystemExit(0)
        return row


def main(argv: list[str] | None = None) -> int:
    """Internal entry points of the cell processes; users run compare.py."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if argv[:1] == ["--run-cell"]:
        return main_cell(argv[1], argv[2])
    if argv[:1] == ["--train-config"]:
        return main_train(argv[1])
    raise SystemExit("usage: python compare.py --help (this module's own entry points are internal)")


if __name__ == "__main__":
    sys.exit(main())
