"""What the cells read, written once under --work: the synthetic shards (with their ceilings) and the stand-in
pretrained encoders.

No pretrained weights can be downloaded on this project's machine, so the "pretrained" settings start from a
stand-in: a MobileOne trained here, image-only, on a separate synthetic corpus (plan.STANDIN_NOTE), with the
scene x quadrant target (standin) or the scene alone (standin-scene). All are cached: a re-run (or a fresh
checkout re-rendering the committed table) finds them and goes on; a stand-in trains only if a cell still to
run starts from it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors.torch import save_file

from mgn.checkpoint.read import load_checkpoint
from mgn.eval.ceiling import ceiling, ground_truth
from mgn.compare.cell import evaluate_run, spawn_training
from mgn.compare.significance import keys_digest
from mgn.compare.plan import (
    DATASETS,
    SHARD_SIZE,
    STANDINS,
    Cell,
    DataSet,
    Options,
    Setting,
    standin_config,
    standin_weights,
    synthetic_dir,
    synthetic_shards,
)
from mgn.data.writer import write_synthetic

log = logging.getLogger("mgn")
CEILING_FILE = "ceiling.json"
# What the ground truth in a data set's json holds; a folder written by an older generator (before the
# splat's body, `splat_box`, which oracle-attention reads) is written again: the same images and labels, the
# generator being deterministic, with the fields the controls need.
DATA_VERSION, DATA_VERSION_FILE = "2 (splat_box)", "data_version.txt"


def prepare(pending: list[Cell], settings: dict[str, Setting], options: Options) -> None:
    """Write the synthetic data of the settings (the caption-only reference and the ceilings read them too)
    and the stand-ins that runs still to do start from; each only when missing."""
    for data in {s.data for s in settings.values() if s.synthetic}:
        prepare_data(DATASETS[data], synthetic_dir(options, DATASETS[data]))
    for init in {c.setting.init for c in pending if c.setting.init in STANDINS}:
        prepare_standin(options, init)


def prepare_data(data: DataSet, out: Path) -> None:
    """One generator run with its ground truth (mgn/io/synthetic.py): `train` samples in the train split, then
    its held-out split (badge uncorrelated) of `validation` + `test` samples, shards of SHARD_SIZE in index
    order, of which plan.synthetic_shards takes the first `validation` samples as the validation set. Then the
    ceilings."""
    if (out / "sizes.json").exists() and (out / DATA_VERSION_FILE).exists() \
            and (out / DATA_VERSION_FILE).read_text().strip() == DATA_VERSION:
        return
    if any(n % SHARD_SIZE or n <= 0 for n in (data.train, data.validation, data.test)):
        raise ValueError(f"data set {data.name!r}: sizes must be positive multiples of {SHARD_SIZE} (whole "
                         "shards)")
    total = data.train + data.validation + data.test
    shutil.rmtree(out, ignore_errors=True)
    log.info("MGN compare: writing the %s data set (%d synthetic samples) to %s", data.name, total, out)
    print(f"MGN compare: writing the {data.name} data set ({total} samples) to {out}", flush=True)
    write_synthetic(out, samples=total, image_size=data.image_size, seed=0,
                    max_samples=SHARD_SIZE, test_fraction=(data.validation + data.test) / total,
                    ground_truth=True,
                    **dict(data.knobs))
    shards = synthetic_shards(out, data)
    ceilings = {split: ceiling(shards[split]) for split in ("validation", "test")}
    (out / CEILING_FILE).write_text(json.dumps(ceilings, indent=2) + "\n")
    (out / DATA_VERSION_FILE).write_text(DATA_VERSION + "\n")  # last: the set is complete


def read_ceilings(settings: dict[str, Setting]) -> dict[str, dict]:
    """Setting -> {"validation": ..., "test": ...} (mgn/eval/ceiling.py) for the synthetic settings whose data
    is written."""
    out = {}
    for name, setting in settings.items():
        if setting.synthetic:
            path = Path(setting.train_shards).parent / CEILING_FILE
            if path.exists():
                out[name] = json.loads(path.read_text())
    return out


def prepare_standin(options: Options, init: str) -> None:
    """Train (once, cached) a stand-in encoder and write its weights as a timm-loadable safetensors file."""
    cfg = standin_config(options, init)
    weights = standin_weights(options, init)
    if weights.exists():
        return
    data = Path(cfg.data.train_shards).parent
    if not (data / "sizes.json").exists():
        shutil.rmtree(data, ignore_errors=True)
        log.info("MGN compare: writing the %s pretraining corpus to %s", init, data)
        write_synthetic(data, samples=1700, image_size=cfg.model.image_size, seed=1, max_samples=SHARD_SIZE,
                        test_fraction=200 / 1700, decoys=0, target=STANDINS[init])
    log.info("MGN compare: pretraining the %s image encoder (%s)", init, cfg.run_dir)
    print(f"MGN compare: pretraining the {init} image encoder ({cfg.run_dir})", flush=True)
    spawn_training(cfg, cfg.run_dir.parent / "pretrain.log", options.threads)
    encoder = load_checkpoint(cfg.run_dir).unfused_student.encoder
    quality = evaluate_run(cfg.run_dir, None)  # how much it learned, on its own held-out corpus
    quality["classes"] = cfg.model.num_classes
    (weights.parent / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(weights))


def read_groups(settings: dict[str, Setting]) -> dict[str, dict]:
    """Setting -> its test set's groups for worst-group accuracy: per sample in key order (the order
    results.jsonl keeps correctness bits in) "<true label>, <badge or no badge>", with the keys' digest; for
    the synthetic settings whose data is written."""
    out = {}
    for name, setting in settings.items():
        truth = ground_truth(setting.test_shards) if setting.synthetic else None
        if truth:
            keys = sorted(truth)
            out[name] = {"keys_sha256": keys_digest(keys),
                         "of_sample": [f"{('safe', 'violent')[truth[k]['true_label']]}, "
                                       f"{'badge' if truth[k]['badge'] else 'no badge'}" for k in keys]}
    return out
