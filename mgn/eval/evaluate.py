"""Evaluate a trained model: the image-only student exactly as deployed, optionally beside the guided teacher.

    load_checkpoint(path)  -> Checkpoint      (mgn/checkpoint/read.py) any of: run dir, checkpoints dir, its
                           `latest`,
                                             a tag dir (ZeRO-0: module states; ZeRO-1/2: consolidated fp32),
                                             student.pt2
    predict(ckpt, batches) -> Predictions     fused student on every sample; teacher and unfused student too
                                             (mgn/eval/predictions.py: the loop the trainer's evaluation
                                             shares)
    summarize(preds, ...)  -> report dict     the metrics (mgn.eval.metrics), kept-by-student ratios
    teacher_and_reliance(objective, batches) the guided teacher's predictions, and how far it follows captions
    run(...)               -> report dict     the whole of `python evaluate.py`: table, eval.json,
    pr_curve.png

The model is always rebuilt from the config saved with the checkpoint, never from command-line options.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mgn import devices, distributed
from mgn.checkpoint.read import Checkpoint, load_checkpoint
from mgn.eval.clip import clip_batches, load_clip, read_prompts
from mgn.config import Config
from mgn.data.loader import build_loader
from mgn.data.decode import ModelInputs, image_normalisation
from mgn.model.finite import require_finite
from mgn.run_paths import RunPaths
from mgn.eval.metrics import classification_metrics, precision_recall_curve
from mgn.eval.predictions import NO_SAMPLES, Predictions, collect, merge
from mgn.io.sources import open_shard
from mgn.io.shard_sets import expand_shards, sample_fields
from mgn.io.tar import MAX_MEMBER_BYTES, ShardError, tar_files

log = logging.getLogger("mgn")

# Metrics shown in the table, in order; "kept" is student / teacher for each.
TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "auroc", "pr_auc", "recall_at_precision",
                 "threshold_at_precision")


# --- running the model ------------------------------------------------------------------------------------

@torch.inference_mode()
def predict(ckpt: Checkpoint, batches: Iterable[dict], *, device: torch.device, teacher: bool = False,
            fusion_check_batches: int | None = 1, allow_empty: bool = False) -> Predictions:
    """Run the deployed student on every batch; with `teacher`, the guided path on the same samples.

    Fused and unfused students are compared on the first `fusion_check_batches` batches (all with None,
    and always all of them with the teacher, which computes the unfused student logits anyway).
    `allow_empty`: a rank of a distributed evaluation may get no shards; the merged set must not be empty.
    """
    require_finite(ckpt.student, f"{ckpt.path} (the student)")
    layout = devices.memory_format(device)
    student = ckpt.student.to(device, memory_format=layout)
    unfused = ckpt.unfused_student.to(device,
                                      memory_format=layout) if ckpt.unfused_student is not None else None
    guided = ckpt.objective.to(device, memory_format=layout) if teacher else None
    if teacher and guided is None:
        raise ValueError("load the checkpoint with teacher=True to evaluate the teacher")
    inputs = ModelInputs(*image_normalisation(ckpt.cfg.model), device, captions=teacher)
    check = {"max_diff": 0.0, "max_logit": 0.0, "agree": 0, "checked": 0, "batches": 0}

    def forward(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        given = inputs(batch)
        image = given["image"]
        logits = student(image).float()
        reference, teacher_logits = None, None
        if guided is not None:
            out = guided.predict(**given)
            teacher_logits, reference = out.teacher, out.student.float()
        elif unfused is not None and (fusion_check_batches is None
                                      or check["batches"] < fusion_check_batches):
            reference = unfused(image).float()
        check["batches"] += 1
        if reference is not None:
            check["max_diff"] = max(check["max_diff"], (logits - reference).abs().max().item())
            check["max_logit"] = max(check["max_logit"], reference.abs().max().item())
            check["agree"] += (logits.argmax(-1) == reference.argmax(-1)).sum().item()
            check["checked"] += len(image)
        return logits, teacher_logits

    preds = collect(batches, forward, ckpt.cfg.model.num_classes, allow_empty=allow_empty)
    if check["checked"]:
        preds.fusion_max_abs_diff, preds.fusion_max_logit = check["max_diff"], check["max_logit"]
        preds.fusion_pred_agree, preds.fusion_checked = check["agree"] / check["checked"], check["checked"]
    return preds


@torch.inference_mode()
def teacher_and_reliance(objective, batches: Iterable[dict], *,
                         device: torch.device) -> tuple[Predictions, dict]:
    """The guided teacher's predictions, and how much they follow the caption rather than the image.

    Predictions: the (unfused) student and the teacher with each image's own caption. Reliance: teacher
    accuracy with the own caption, with the caption of an image of another label (sample i of label y gets the
    caption of the i-th sample whose label is not y, cyclically), and with an empty caption (every text
    position masked, as caption dropout does), plus the share of predictions the swap changes. A teacher that
    reads the image barely moves; one that reads the label off the caption falls below chance when captions
    are swapped. `batches` is read twice: once for the captions, once for the images, each encoded once for
    its three captions (the image encoder is most of an evaluation's cost).
    """
    require_finite(objective, "the guided teacher")
    captions, labels = {}, {}
    for batch in batches:  # pass 1: every sample's caption tokens and label
        for key, ids, mask, label in zip(batch["key"], batch["input_ids"], batch["attention_mask"],
                                         batch["label"]):
            captions[key], labels[key] = (ids, mask), int(label)
    if not labels:
        raise ValueError(NO_SAMPLES)
    keys = sorted(labels)
    donor_of = {}
    for label in set(labels.values()):
        others = [k for k in keys if labels[k] != label]
        if not others:
            raise ValueError("caption swap needs test samples of at least two labels")
        mine = [k for k in keys if labels[k] == label]
        donor_of.update({k: others[i % len(others)] for i, k in enumerate(mine)})
    counts = {"own": 0, "swapped": 0, "empty": 0, "changed": 0}
    objective = objective.to(device, memory_format=devices.memory_format(device)).eval()
    inputs = ModelInputs(*image_normalisation(objective.cfg.model), device)

    def forward(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:  # pass 2: each image under three captions
        truth = batch["label"].to(device)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        swapped = {"input_ids": torch.stack([captions[donor_of[k]][0] for k in batch["key"]]).to(device),
                   "attention_mask": torch.stack([captions[donor_of[k]][1] for k in batch["key"]]).to(device)}
        own, other, empty = objective.predict_captions(inputs.image(batch["image"]), [
            {"input_ids": ids, "attention_mask": mask}, swapped,
            {"input_ids": ids, "attention_mask": torch.zeros_like(mask)}])
        said = {name: out.teacher.argmax(-1) for name, out in (("own", own), ("swapped", other),
                                                                ("empty", empty))}
        for name in ("own", "swapped", "empty"):
            counts[name] += int((said[name] == truth).sum())
        counts["changed"] += int((said["own"] != said["swapped"]).sum())
        return own.student, own.teacher

    preds = collect(batches, forward, objective.cfg.model.num_classes)
    n = len(labels)
    return preds, {"samples": n, "teacher_accuracy": counts["own"] / n,
                   "swapped_caption_accuracy": counts["swapped"] / n,
                   "empty_caption_accuracy": counts["empty"] / n, "changed_by_swap": counts["changed"] / n}


# --- reporting --------------------------------------------------------------------------------------------

def summarize(preds: Predictions, target_precision: float | None) -> dict:
    """Metrics for the student (and teacher), the share of each teacher metric the student keeps."""
    report = {"samples": len(preds.labels),
              "student": classification_metrics(preds.labels, preds.student, target_precision)}
    if preds.teacher is not None:
        report["teacher"] = classification_metrics(preds.labels, preds.teacher, target_precision)
        report["kept"] = {k: _ratio(report["student"].get(k), report["teacher"].get(k))
                          for k in TABLE_METRICS if k != "threshold_at_precision"}
        report["student_teacher_agreement"] = float((preds.student.argmax(1)
                                                     == preds.teacher.argmax(1)).mean())
    if preds.fusion_checked:
        report["fusion_check"] = {"samples": preds.fusion_checked, "max_abs_diff": preds.fusion_max_abs_diff,
                                  "max_abs_logit": preds.fusion_max_logit,
                                  "prediction_agreement": preds.fusion_pred_agree}
    return report


def _ratio(a, b):
    if a is None or b is None or not isinstance(a, float) or not isinstance(b,
                                                                            float) or b == 0 or math.isnan(b):
        return None
    return a / b


def format_table(report: dict, model_name: str = "student") -> str:
    """A fixed-width table: metric rows, student (or `model_name`) / teacher / kept columns, confusion
    matrices."""
    has_teacher = "teacher" in report
    target = report["student"].get("target_precision")
    names = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1",
             "auroc": "AUROC",
             "pr_auc": "PR-AUC (average precision)",
             "recall_at_precision": f"recall at precision >= {target}",
             "threshold_at_precision": f"threshold for precision >= {target}"}
    header = f"{'metric':<36}{model_name:>10}" + (f"{'teacher':>10}{'kept':>8}" if has_teacher else "")
    lines = [header, "-" * len(header)]
    for key in TABLE_METRICS:
        if key not in report["student"]:
            continue
        row = f"{names[key]:<36}{_fmt(report['student'][key]):>10}"
        if has_teacher:
            kept = report["kept"].get(key)
            row += (f"{_fmt(report['teacher'].get(key)):>10}"
                    f"{(f'{100 * kept:.1f}%' if kept is not None else '-'):>8}")
        lines.append(row)
    lines.append(f"{'samples':<36}{report['samples']:>10}")
    for role in ("student", "teacher") if has_teacher else ("student",):
        matrix = report[role]["confusion_matrix"]
        lines.append(f"confusion matrix, {role} (rows: true class, columns: predicted): "
                     + " ".join(str(row) for row in matrix))
    if has_teacher:
        lines.append("student and teacher predict the same class on "
                     f"{100 * report['student_teacher_agreement']:.1f}%"
                     f" of samples")
    check = report.get("fusion_check")
    if check:
        lines.append(f"fused vs unfused student on {check['samples']} samples: max |logit diff| "
                     f"{check['max_abs_diff']:.2e} (logits up to {check['max_abs_logit']:.2f}), same class "
                     "on "
                     f"{100 * check['prediction_agreement']:.1f}%")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def plot_pr_curves(preds: Predictions, report: dict, path: Path,
                   model_name: str = "student (image only)") -> Path:
    """Precision-recall curves (positive class 1; one-vs-rest micro-average with more classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for role, key, probs in ((model_name, "student", preds.student), ("teacher (guided)", "teacher",
                                                                      preds.teacher)):
        if probs is None:
            continue
        if probs.shape[1] == 2:
            truth, scores = preds.labels == 1, probs[:, 1]
        else:
            truth, scores = (np.eye(probs.shape[1])[preds.labels] == 1).ravel(), probs.ravel()
        if truth.all() or not truth.any():
            continue
        precision, recall, _ = precision_recall_curve(truth, scores)
        ax.plot(recall, precision, label=f"{role}, AP {report[key]['pr_auc']:.3f}")
        if report[key].get("threshold_at_precision") is not None:
            ax.plot(report[key]["recall_at_precision"], report[key]["target_precision"], "o", color="black",
                    label="best recall at the target" if key == "student" else None)
    target = report["student"].get("target_precision")
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target precision {target}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title="precision-recall" + ("" if preds.student.shape[1] == 2
                                       else " (micro-average, one-vs-rest)"))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- the command ------------------------------------------------------------------------------------------

def default_out_dir(ckpt: Checkpoint) -> Path:
    if ckpt.kind == "student":
        return RunPaths.evaluation_beside(ckpt.path)
    return RunPaths(ckpt.path.parent.parent).evaluation(ckpt.path.name)  # a tag: <run>/checkpoints/<tag>


def run(ckpt_path: str | Path, *, shards: str | None = None, teacher: bool = False,
        target_precision: float | None = 0.9, batch_size: int | None = None, num_workers: int | None = None,
        device: str = "auto", batch_form: str = "auto", out_dir: str | Path | None = None,
        tensorboard: str | Path | None = None, fusion_check_batches: int | None = 1, trust: bool = False,
        quiet: bool = False) -> dict:
    """Everything `python evaluate.py` does; returns the report written to eval.json (on rank 0)."""
    world = distributed.detect_world()
    torch_device = distributed.pick_device(device, world.local_rank, flag="--device")
    if world.world_size > 1:  # gloo on CPU, NCCL on GPU; each rank then reads its own shards
        distributed.init_distributed(world, timeout_s=600, device_name=torch_device.type)
    ckpt = load_checkpoint(ckpt_path, teacher=teacher, trust=trust)
    cfg = ckpt.cfg
    data_cfg = dataclasses.replace(cfg.data, **({"test_shards": shards} if shards else {}),
                                   **({"num_workers": num_workers} if num_workers is not None else {}))
    require_labels(expand_shards(data_cfg.test_shards), max_member_bytes=data_cfg.max_member_bytes,
                   label_member=sample_fields(data_cfg.test_shards).label_member)
    preds = predict(ckpt, test_batches(cfg, data_cfg, teacher, batch_size, world.rank, world.world_size,
                                       device=torch_device, batch_form=batch_form),
                    device=torch_device, teacher=teacher, fusion_check_batches=fusion_check_batches,
                    allow_empty=world.world_size > 1)
    preds = merge(distributed.gather_objects(preds))
    distributed.shutdown()  # the last collective: rank 0 writes the report alone
    if len(preds.labels) == 0:
        raise ValueError(NO_SAMPLES)
    if not world.is_main:
        return {}
    report = summarize(preds, target_precision)
    out = Path(out_dir) if out_dir else default_out_dir(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": {"path": str(ckpt.path), "kind": ckpt.kind, "description": ckpt.describe(),
                       "tag": ckpt.tag, "step": ckpt.step, "zero_stage": ckpt.zero_stage,
                       "stored_fused": ckpt.stored_fused, "stored_dtype": ckpt.dtype, "notes": ckpt.notes},
        "evaluated": "image-only student, reparameterized (fused) and in eval mode, fp32: the deployed model"
                     + ("; teacher: guided network with captions" if teacher else ""),
        "shards": data_cfg.test_shards, "device": str(torch_device), "world_size": world.world_size,
        "seconds": round(preds.seconds, 3), **report,
        "files": {"json": str(out / "eval.json"), "pr_curve": str(out / "pr_curve.png")},
        "versions": _versions(), "config": cfg.to_dict(),
    }
    plot_pr_curves(preds, report, out / "pr_curve.png")
    (out / "eval.json").write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    if tensorboard:
        _log_tensorboard(Path(tensorboard), report, preds, ckpt.step or 0)
    if not quiet:
        print(f"MGN evaluate: {ckpt.path}\n  {ckpt.describe()}\n  shards {data_cfg.test_shards}, "
              f"{report['samples']} samples, device {torch_device}, {preds.seconds:.1f} s")
        for note in ckpt.notes:
            print(f"  note: {note}")
        print(format_table(report))
        print(f"wrote {out / 'eval.json'} and {out / 'pr_curve.png'}"
              + (f"; TensorBoard: {tensorboard}" if tensorboard else ""))
    return report


@torch.inference_mode()
def predict_clip(clip, batches: Iterable[dict], *, device: torch.device) -> Predictions:
    """CLIP zero-shot class probabilities on every batch (in the `student` field: the image-only model
    scored)."""
    clip = clip.to(device)
    inputs = ModelInputs(clip.mean, clip.std, device)
    return collect(batches, lambda batch: (clip(inputs.image(batch["image"])), None), clip.classes.shape[0])


def run_clip(model: str, *, shards: str, prompts: str | None = None, target_precision: float | None = 0.9,
             batch_size: int = 64, num_workers: int = 2, device: str = "auto",
             out_dir: str | Path | None = None,
             allow_download: bool = False, quiet: bool = False) -> dict:
    """`python evaluate.py --clip MODEL --shards ...`: the CLIP zero-shot baseline, reported like the
    student."""
    torch_device = distributed.pick_device(device, flag="--device")
    class_prompts = read_prompts(prompts)
    clip = load_clip(model, class_prompts, allow_download=allow_download)
    require_labels(expand_shards(shards))
    preds = predict_clip(clip, clip_batches(clip, shards, batch_size=batch_size, num_workers=num_workers),
                         device=torch_device)
    report = summarize(preds, target_precision)
    out = Path(out_dir) if out_dir else Path("eval") / f"clip-{Path(model).name}"
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": {"clip": model, "prompts": class_prompts, "image_size": clip.image_size},
              "evaluated": "CLIP zero-shot: cosine similarity of the image to each class's mean prompt "
                           "embedding",
              "shards": shards, "device": str(torch_device), "seconds": round(preds.seconds, 3), **report,
              "files": {"json": str(out / "eval.json"), "pr_curve": str(out / "pr_curve.png")},
              "versions": _versions()}
    plot_pr_curves(preds, report, out / "pr_curve.png", model_name="CLIP zero-shot")
    (out / "eval.json").write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    if not quiet:
        print(f"MGN evaluate: CLIP zero-shot {model}, {len(class_prompts)} classes "
              f"({', '.join(class_prompts)}), {clip.image_size} px\n  shards {shards}, {report['samples']} "
              "samples, "
              f"device {torch_device}, {preds.seconds:.1f} s")
        print(format_table(report, model_name="CLIP"))
        print(f"wrote {out / 'eval.json'} and {out / 'pr_curve.png'}")
    return report


def require_labels(shards: list[str], members: int = 12, max_member_bytes: int = MAX_MEMBER_BYTES,
                   label_member: str = "cls") -> None:
    """Fail before any model runs when shards carry no labels: no `label_member` (`cls`, or the `json` the
    card names a label field in) among each shard's first files. Read with the loader's own reader and member
    cap (`tarfile` would allocate what a pax header claims)."""
    for shard in shards:
        try:
            with open_shard(shard) as f:
                names = [name for _, (name, _) in zip(range(members), tar_files(f,
                                                                                max_member_bytes=max_member_bytes))]
        except (ShardError, OSError):
            continue  # a damaged shard is the reader's to report, with its skip accounting
        if names and not any(name.endswith("." + label_member) for name in names):
            raise ValueError(f"{shard} has no labels (no .{label_member} file among its first samples: "
                             f"{names[:4]}); evaluation needs labelled shards, e.g. written by `python -m "
                             f"mgn.shards`, or indexed by its --index with --label-from")


def test_batches(cfg: Config, data_cfg, teacher: bool, batch_size: int | None, rank: int = 0,
                 world_size: int = 1,
                 *, device: torch.device = torch.device("cpu"), batch_form: str = "auto"):
    """The test loader for a checkpoint's config: its image size and normalisation, captions when asked,
    batches in the form `batch_form` (auto: the device's, mgn.devices.batch_form; `data.batch_form` of the run
    otherwise plays no part: evaluation may run on another device than training did)."""
    return build_loader(cfg, "test", rank=rank, world_size=world_size, captions=teacher,
                        batch_size=batch_size,
                        data=data_cfg, batch_form=devices.batch_form(batch_form, device),
                        pin=devices.pins_batches(device))


def _log_tensorboard(log_dir: Path, report: dict, preds: Predictions, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter  # only with --tensorboard

    board = SummaryWriter(str(log_dir))
    for role in ("student", "teacher"):
        if role not in report:
            continue
        for name, value in report[role].items():
            if isinstance(value, float) and not math.isnan(value):
                board.add_scalar(f"eval/{role}_{name}", value, step)
        probs = preds.student if role == "student" else preds.teacher
        if probs.shape[1] == 2:
            board.add_pr_curve(f"eval/{role}_pr", torch.as_tensor(preds.labels), torch.as_tensor(probs[:, 1]),
                               step)
    board.close()


def _versions() -> dict:
    import platform

    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__}


def _finite(value):
    """NaN (e.g. AUROC with one class present) becomes null, so eval.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
