"""The plan: settings (data size x initialisation of the image encoder), and cells (setting x arm x seed).

Nothing here trains or writes: a plan is computed, printed and estimated before anything runs, so that
`--dry-run` shows exactly what a run would do. A cell's configs are derived from the comparison's base
config, the arm's overrides and the cell's seed alone; their fingerprint is what results.jsonl records,
so a re-run recognises the cells it already has.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mgn.compare.arms import Arm
from mgn.config import Config, preset_config
from mgn.shard_sets import expand_shards, read_sizes

SHARD_SIZE = 100  # synthetic samples per shard: data sizes are whole shards
STANDIN_NOTE = ("STAND-IN: no ImageNet weights can be downloaded here; 'standin' is a MobileOne pretrained by this "
                "runner, image-only, on a separate synthetic corpus (another seed, 8-class scene x splat-quadrant "
                "target, no moderation label). It plays the role of the paper's ImageNet initialisation.")
DEFAULT_ARMS = ("baseline", "guided", "guided-unfrozen", "attend-fusion", "no-student-term")
REDUCED_ARMS = ("baseline", "guided")  # what the plentiful and pretrained settings run by default


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
            raw["train"].update(seed=self.seed, output_dir=str(folder), epochs=epochs[index], resume="auto",
                                run_name=f"{self.arm.name}-s{self.seed}{suffix}")
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
    allow_truncated_captions: bool = False  # compare guided arms even when their captions are cut (mgn/captions.py)
    clip: str | None = None  # a CLIP model folder: adds the zero-shot reference row
    prompts: str | None = None  # its prompt file (mgn/clip.py)
    command: str = "python compare.py"  # as typed, for the verdict's header


def plan(options: Options, arms: dict[str, Arm], data: dict[str, Setting]) -> list[Cell]:
    """The cells: all chosen arms in the first setting, the reduced set elsewhere (unless asked for all)."""
    chosen = list(arms) if options.arms == ["all"] else options.arms or [a for a in DEFAULT_ARMS if a in arms]
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {sorted(arms)} (mgn/compare/arms.toml, --arms-file)")
    if "baseline" not in chosen:
        chosen = ["baseline", *chosen]
    base = options.base
    cells = []
    for index, setting in enumerate(data.values()):
        names = chosen if index == 0 or options.all_settings_all_arms else [a for a in chosen if a in REDUCED_ARMS]
        for seed in range(options.seeds):
            cells += [Cell(setting, arms[name], seed, base) for name in names]
    return cells


def samples_seen(cell: Cell, work: Path) -> int:
    return sum(cell.setting.train_samples * c.train.epochs for c in cell.stage_configs(work))


def settings_for(options: Options) -> dict[str, Setting]:
    """The settings of the plan, keyed by name; nothing is written (prepare() writes what they need)."""
    if options.train_shards or options.test_shards:
        if not (options.train_shards and options.test_shards):
            raise ValueError("--train-shards and --test-shards go together")
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


# --- where the prepared inputs live (mgn/compare/prepare.py writes them) ---------------------------------

def synthetic_dir(options: Options) -> Path:
    return options.work / "data" / f"synthetic-{options.scarce}-{options.plentiful}-{options.test}"


def standin_config(options: Options) -> Config:
    """Image-only pretraining on a separate corpus: seed 1, no decoys, the 8-class scene x quadrant target."""
    folder = options.work / "standin"
    return preset_config("compare", {
        "objective": {"name": "baseline"}, "model": {"num_classes": 8},
        "data": {"train_shards": str(folder / "data" / "train-*.tar"),
                 "test_shards": str(folder / "data" / "test-*.tar"), "synthetic_samples": 0},
        "train": {"output_dir": str(folder), "run_name": "pretrain", "resume": "auto", "seed": 0}})


def standin_weights(options: Options) -> Path:
    return options.work / "standin" / "encoder.safetensors"
