"""Training step time: every objective (guided MGN and its variants) vs. the image-only baseline, side by
side, and the baseline vs. a bare PyTorch step.

The engines are built in one process and timed in alternating rounds on the same in-memory batches,
so machine noise hits them alike. Batches come as training's own loader makes them for the device (uint8 NHWC
pinned on a GPU) and reach the model through training's own input path (mgn.data.decode.ModelInputs). "guided"
encodes every caption (a first epoch); "guided_cached"
has `model.text_cache` on and has seen the captions (later epochs; one rank: on N ranks a caption returns to
its rank's cache with probability 1/N); "guided_blocks" reads the captions' precomputed blocks
(`data.text_blocks`, mgn/train/text_blocks.py: the frozen text encoder out of the step at any scale).
"bare" is the baseline's step
without the project: a plain loop over the same student (mgn.model.networks.ImageClassifier), micro-batch,
AdamW parameter groups, label smoothing, gradient clip and autocast, with no DeepSpeed, no non-finite
guard and no schedule; `baseline_over_bare` is what the project's machinery costs. `components_s` splits
the guided step into its parts, timed alone in the same rounds: image_encoder (forward + backward),
text_encoder (the frozen forward), fusion and attention (forward + backward, with the student's head on the
attended features), optimizer (AdamW over every trained parameter). A second pass feeds the guided engine
from the real loader to measure the data-wait fraction of step time.

    python benchmarks/train_step.py                        # demo preset, CPU
    python benchmarks/train_step.py --preset paper --workers 8   # on a GPU node (needs paper shards)
    python benchmarks/train_step.py --preset tiny --steps 1 --rounds 2 --warmup 1 \
        --out /tmp/step.json  # smoke
    # the paper's shapes without its data or a download: synthetic 224 px shards, a random-init DistilBERT
    python benchmarks/train_step.py --preset paper --device cuda --shards /tmp/paper-shards \
        --synthetic-samples 1024 --random-text-encoder distilbert \
        --modes baseline,bare,guided,guided_cached,guided_blocks --workers 8
Goals: guided/baseline step-time ratio <= 1.5; baseline/bare <= 1.05; data wait < 5% with enough workers.

--random-text-encoder distilbert builds DistilBERT-base's architecture (6 layers, 768 hidden, 12 heads, 3,072
feed-forward) with random weights and the packaged MiniLM's tokenizer (DistilBERT's uncased vocabulary, 30,522
tokens) into a folder beside --out, and uses it as model.text_model: the cost of the paper's text encoder,
without its weights (which come from the hub). `tiny` builds a one-layer, 32-wide one for smoke runs.
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgn import devices, distributed  # noqa: E402
from mgn.train import text_blocks  # noqa: E402
from mgn.config import OBJECTIVES, PACKAGED_MINILM, PRESETS, Config, preset_config, resolve_text_model  # noqa: E402
from mgn.data.loader import build_loader  # noqa: E402
from mgn.data.decode import ModelInputs, image_normalisation  # noqa: E402
from mgn.train.engine import autocast, build_engine, param_groups, precision  # noqa: E402
from mgn.model.networks import ImageClassifier, TextBlockEncoder, grid_size  # noqa: E402
from mgn.train.run_folder import ensure_demo_shards  # noqa: E402
from mgn.train.loop import build_model  # noqa: E402

Step = Callable[[dict], None]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work before reading the clock (a GPU runs behind the host)."""
    if devices.is_gpu(device):
        torch.cuda.synchronize(device)


def loader(cfg: Config, world, device: torch.device):
    """Training's own loader: its batch form for the device (uint8 NHWC pinned on a GPU) and its pin
    thread."""
    return build_loader(cfg, "train", rank=world.rank, world_size=world.world_size, captions=True,
                        batch_form=devices.batch_form(cfg.data.batch_form, device),
                        pin=devices.pins_batches(device))


def model_inputs(cfg: Config, device: torch.device) -> ModelInputs:
    return ModelInputs(*image_normalisation(cfg.model), device, captions=cfg.uses_captions)


def engine_step(engine, cfg: Config, device: torch.device) -> Step:
    """The project's step, as mgn.train.loop.Trainer takes it: the batch to the device
    (mgn.data.decode.ModelInputs), forward under autocast, DeepSpeed backward and step."""
    inputs = model_inputs(cfg, device)

    def step(batch: dict) -> None:
        with autocast(cfg, device):
            output = engine(**inputs(batch), label=batch["label"].to(device, non_blocking=True))
        engine.backward(output.loss)
        engine.step()
    return step


def bare_step(cfg: Config, device: torch.device) -> Step:
    """The baseline's step in plain PyTorch, from the same initial weights (same seed, student built
    first)."""
    torch.manual_seed(0)
    student = ImageClassifier(cfg.model).to(device, memory_format=devices.memory_format(device)).train()
    # parameter names as in an objective ("student.encoder..."), so the groups and their rates are the
    # baseline's
    groups = param_groups(nn.ModuleDict({"student": student}), cfg)
    optimizer = torch.optim.AdamW(groups, fused=True)  # the project's GuardedAdamW, unguarded
    params = [p for group in groups for p in group["params"]]
    inputs = model_inputs(cfg, device)  # the same way in for a batch as the project's step: no advantage

    def step(batch: dict) -> None:
        image = inputs.image(batch["image"])
        label = batch["label"].to(device, non_blocking=True)
        with autocast(cfg, device):
            loss = F.cross_entropy(student(image).float(), label, label_smoothing=cfg.train.label_smoothing)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# Random-init text encoders of a given architecture (DistilBertConfig fields), for --random-text-encoder.
TEXT_STANDINS = {
    "distilbert": {"dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072},  # distilbert-base-uncased
    "tiny": {"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64},
}


def mode_names() -> list[str]:
    return ["baseline", "bare", "guided", "guided_cached", "guided_blocks",
            *[name for name in OBJECTIVES if name not in ("baseline", "guided")], "caption_dropout"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before the rounds")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the data-wait pass")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: the GPU when CUDA works; cuda: fail unless it does")
    parser.add_argument("--modes", default=",".join(mode_names()),
                        help=f"comma-separated steps to time, baseline and guided always among them "
                             f"(default: all of {','.join(mode_names())})")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the preset's "
                                                                      "train.micro_batch")
    parser.add_argument("--shards", default=None, metavar="DIR",
                        help="read (and with --synthetic-samples write) train-*.tar / test-*.tar in DIR "
                             "instead "
                             "of the preset's shards")
    parser.add_argument("--synthetic-samples", type=int, default=None,
                        help="write this many synthetic samples at the preset's image size where the shards "
                             "are "
                             "missing (default: the preset's data.synthetic_samples)")
    parser.add_argument("--text-model", default=None, help="model.text_model: hub name, local folder or "
                                                            f"{PACKAGED_MINILM} (default: the preset's)")
    parser.add_argument("--random-text-encoder", default=None, choices=sorted(TEXT_STANDINS),
                        help="use a random-init text encoder of this architecture with the packaged uncased "
                             "vocabulary, built beside --out (see above); for timing only")
    parser.add_argument("--components", action="store_true",
                        help="also time the guided step's parts (components_s: image_encoder, text_encoder, "
                             "fusion, "
                             "attention, optimizer)")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(mode_names()))
    if unknown or not {"baseline", "guided"} <= set(modes):
        parser.error(f"--modes {args.modes}: expected names among {','.join(mode_names())}, with baseline "
                     "and guided")
    if args.text_model and args.random_text_encoder:
        parser.error("--text-model and --random-text-encoder: choose one")
    args.modes = [m for m in mode_names() if m in modes]
    return args


def build_text_standin(kind: str, directory: Path, vocabulary: str = PACKAGED_MINILM) -> dict:
    """A random-init DistilBERT-architecture encoder with the packaged MiniLM's tokenizer (DistilBERT's
    uncased vocabulary) in `directory` (kept and reused when it is already there with the same architecture).
    `vocabulary`: a folder holding that tokenizer's files instead, for machines without the package
    (benchmarks/gpu_check.sh builds the stand-in so beforehand); read only when the encoder is built."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel  # heavy

    dims = TEXT_STANDINS[kind]
    config_file = directory / "config.json"
    if not (config_file.exists() and all(json.loads(config_file.read_text()).get(k) == v for k,
                                         v in dims.items())):
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(vocabulary))
        tokenizer.save_pretrained(directory)
        torch.manual_seed(0)
        model = DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                                                 **dims))
        model.save_pretrained(directory)
    shape = " (distilbert-base-uncased's)" if kind == "distilbert" else ""
    return {"path": str(directory), "stand_in": True, "kind": kind,
            "architecture": (f"DistilBERT, {dims['n_layers']} layers x {dims['dim']} hidden, "
                             f"{dims['n_heads']} "
                             f"heads{shape}"),
            **dims,
            "weights": "random init (seed 0): timing only; the paper's distilbert-base-uncased comes from "
                       "the hub",
            "tokenizer": f"the packaged MiniLM's ({PACKAGED_MINILM}: DistilBERT's uncased vocabulary)"}


def overrides(args: argparse.Namespace, text_model: str | None) -> dict[str, dict]:
    """The config sections every mode shares, from the command line."""
    out: dict[str, dict] = {"model": {}, "data": {"num_workers": args.workers},
                            "train": {"device": args.device}}
    if text_model:
        out["model"]["text_model"] = text_model
    if args.micro_batch:
        out["train"]["micro_batch"] = args.micro_batch
    if args.shards:
        out["data"].update(train_shards=str(Path(args.shards) / "train-*.tar"),
                           test_shards=str(Path(args.shards) / "test-*.tar"))
    if args.synthetic_samples is not None:
        out["data"]["synthetic_samples"] = args.synthetic_samples
    return out


def objective_configs(preset: str, workers: int, shared: dict[str, dict] | None = None,
                      modes: list[str] | None = None) -> dict[str, Config]:
    shared = shared or {"data": {"num_workers": workers}}
    cached = {"freeze_text": True, "text_cache": 10**6}
    variants = {"baseline": ({"name": "baseline"}, {}),
                # encodes every caption
                "guided": ({"name": "guided"}, {"freeze_text": True, "text_cache": 0}),
                "guided_cached": ({"name": "guided"}, cached),
                # + with_blocks
                "guided_blocks": ({"name": "guided"}, {"freeze_text": True, "text_cache": 0}),
                # every other objective, with the text cache of later epochs: the cost line of each variant
                # (not the positive controls: they need synthetic ground truth in the batches, and cost what
                # the baseline does)
                **{name: ({"name": name}, cached) for name, info in OBJECTIVES.items()
                   if name not in ("baseline", "guided") and not info.control},
                "caption_dropout": ({"name": "guided", "caption_dropout": 0.5}, cached)}
    return {name: preset_config(preset, {**shared, "objective": objective,
                                         "model": {**shared.get("model", {}), **model}})
            for name, (objective, model) in variants.items() if modes is None or name in modes}


def with_blocks(batches: list[dict], encoder: TextBlockEncoder, cfg: Config,
                device: torch.device) -> list[dict]:
    """The batches as the loader gives them with `data.text_blocks`: each caption's block, pooled to the image
    grid and stored in bf16 (what mgn/train/text_blocks.py writes), in place of its tokens."""
    out = []
    for batch in batches:
        block = text_blocks.encode_blocks(encoder, batch["input_ids"].to(device),
                                          batch["attention_mask"].to(device),
                                          grid_size(cfg.model)).cpu()
        out.append({k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")} |
                   {"text_block": block})
    return out


def component_steps(objective: nn.Module, cfg: Config, batches: list[dict], device: torch.device,
                    seen: dict | None = None) -> dict[str, Step]:
    """The guided step's parts, each a step of its own on the same batches (see the module's docstring); the
    inputs of each part are computed once, beforehand, so a part's time is its own. For `components_s`.
    `seen["text_autocast"]`: the autocast the text part ran under, as torch reports it there."""
    guide, student = objective.guide, objective.student
    inputs, to_device = [], model_inputs(cfg, device)
    with torch.no_grad(), autocast(cfg, device):
        for batch in batches:
            image = to_device.image(batch["image"])
            embedding = student.encoder(image)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            text = F.adaptive_avg_pool2d(guide.text(ids, mask), embedding.shape[-2:]).to(embedding.dtype)
            joint = torch.cat([embedding, text], dim=1)
            inputs.append({"image": image, "ids": ids, "mask": mask, "joint": joint,
                           "fusion": guide.fusion(joint),
                           "embedding": embedding})
    by_batch = {id(batch): made for batch, made in zip(batches, inputs)}
    trained = [p for p in objective.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(trained, lr=1e-6, fused=True)

    def part(run: Callable[[dict], torch.Tensor | None]) -> Step:
        def step(batch: dict) -> None:
            with autocast(cfg, device):
                out = run(by_batch[id(batch)])
            if out is not None:
                out.float().sum().backward()
        return step

    def attention(x: dict) -> torch.Tensor:
        values = x["fusion"] if cfg.model.attend_to == "fusion" else x["embedding"]
        attended, _ = guide.attention(x["fusion"].detach().requires_grad_(), values.detach().requires_grad_())
        return (guide.teacher_head if guide.teacher_head is not None else student.head)(attended)

    def text(x: dict) -> None:
        if seen is not None:
            seen["text_autocast"] = (str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
                                     if torch.is_autocast_enabled(device.type) else "off")
        with torch.no_grad():
            guide.text(x["ids"], x["mask"])

    return {"image_encoder": part(lambda x: student.encoder(x["image"])), "text_encoder": part(text),
            "fusion": part(lambda x: guide.fusion(x["joint"].detach().requires_grad_())),
            "attention": part(attention), "optimizer": lambda batch: optimizer.step()}


def time_rounds(steps: dict[str, Step], batches: list[dict] | dict[str, list[dict]], device: torch.device,
                warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each mode, one mean per round; the modes take turns in every round. `batches`: the
    same for every mode, or each mode's own (guided_blocks reads blocks where the others read tokens)."""
    batches_of = batches if isinstance(batches, dict) else {mode: batches for mode in steps}
    for mode, step in steps.items():  # warmup: allocator, kernels, lazy init
        for batch in itertools.islice(itertools.cycle(batches_of[mode]), warmup):
            step(batch)
    times = {mode: [] for mode in steps}
    for _ in range(rounds):
        for mode, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for batch in batches_of[mode]:
                step(batch)
            synchronize(device)
            times[mode].append((time.perf_counter() - start) / len(batches_of[mode]))
    return times


def data_wait(step: Step, batches, device: torch.device, steps: int) -> tuple[float, float]:
    """(samples/s, share of the step spent waiting for the loader) of `step` fed by `batches`."""
    wait = total = 0.0
    samples = 0
    tick = time.perf_counter()
    for i, batch in enumerate(batches):
        fetched = time.perf_counter()
        step(batch)
        synchronize(device)
        done = time.perf_counter()
        if i >= 2:  # skip worker start-up
            wait += fetched - tick
            total += done - tick
            samples += len(batch["label"])
        tick = done
        if i + 1 == steps + 2:
            break
    return samples / total, wait / total


def main() -> None:
    args = parse_args()
    text = None
    if args.random_text_encoder:
        text = build_text_standin(args.random_text_encoder,
                                  Path(args.out).resolve().parent
                                  / f"text-standin-{args.random_text_encoder}")
    configs = objective_configs(args.preset, args.workers, overrides(args, text and text["path"]), args.modes)
    world = distributed.detect_world()
    device = distributed.init_distributed(world, timeout_s=300, device_name=args.device, flag="--device")
    ensure_demo_shards(configs["guided"])
    engines = {}
    for mode, cfg in configs.items():
        torch.manual_seed(0)
        # training's: the device's layout, SyncBatchNorm if asked
        objective, _ = build_model(cfg, world, device)
        engines[mode] = build_engine(objective, cfg, device, total_steps=10**6)
        engines[mode].train()
    steps = {mode: engine_step(engine, configs[mode], device) for mode, engine in engines.items()}
    if "bare" in args.modes:
        steps = {"baseline": steps.pop("baseline"), "bare": bare_step(configs["baseline"], device), **steps}
    batches = list(itertools.islice(loader(configs["guided"], world, device), args.steps))
    batches_of = {mode: batches for mode in steps}
    if "guided_blocks" in steps:
        encoder = engines["guided_blocks"].module.guide.text
        batches_of["guided_blocks"] = with_blocks(batches, encoder, configs["guided_blocks"], device)
    seen = {}
    if args.components:
        parts = component_steps(engines["guided"].module, configs["guided"], batches, device, seen)
        steps |= {f"part:{name}": step for name, step in parts.items()}
        batches_of |= {f"part:{name}": batches for name in parts}

    times = time_rounds(steps, batches_of, device, args.warmup, args.rounds)
    components = {mode.removeprefix("part:"): times.pop(mode) for mode in list(times)
                  if mode.startswith("part:")}
    steps = {mode: step for mode, step in steps.items() if not mode.startswith("part:")}
    with_loader, wait = data_wait(steps["guided"], loader(configs["guided"], world, device), device,
                                  args.steps)

    micro_batch = configs["guided"].train.micro_batch
    step_s = {mode: statistics.median(t) for mode, t in times.items()}
    model = configs["guided"].model
    encoder = next(m for m in engines["guided"].module.modules() if isinstance(m, TextBlockEncoder))
    result = {
        "preset": args.preset, "device": str(device), "precision": precision(configs["baseline"], device),
        "shapes": {"image_model": model.image_model, "image_size": model.image_size, "seq_len": model.seq_len,
                   "fusion_dim": model.fusion_dim, "attention_heads": model.attention_heads,
                   "text_hidden": encoder.hidden_size},
        "text_model": {**(text or {"name": model.text_model, "stand_in": False}),
                       "parameters": sum(p.numel() for p in encoder.model.parameters())},
        "train_shards": configs["guided"].data.train_shards,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__, "micro_batch": micro_batch, "steps_per_round": args.steps,
        "rounds": args.rounds, "warmup_steps": args.warmup,
        "step_s": step_s, "step_s_rounds": times,
        "loader_workers": args.workers, "guided_samples_per_s_with_loader": with_loader,
        "data_wait_fraction": wait,
        "guided_over_baseline": step_s["guided"] / step_s["baseline"],
        "bare_step": "plain PyTorch loop: ImageClassifier, torch.optim.AdamW (same parameter groups), "
                     "cross-entropy "
                     "with "
                "the same label smoothing, clip_grad_norm_, the project's autocast; no DeepSpeed, guard or "
                "schedule",
    }
    for mode in ("guided_cached", "guided_blocks"):
        if mode in step_s:
            result[f"{mode}_over_baseline"] = step_s[mode] / step_s["baseline"]
    if components:
        result["components_s"] = {name: statistics.median(t) for name, t in components.items()}
        result["components_s_rounds"] = components
        result["components_share_of_guided"] = {name: t / step_s["guided"]
                                                for name, t in result["components_s"].items()}
        # the frozen text encoder's forward alone, per sample, under the training step's autocast
        result["text_forward_ms_per_sample"] = 1e3 * result["components_s"]["text_encoder"] / micro_batch
        result["text_forward_autocast"] = seen.get("text_autocast")
    if "bare" in step_s:
        result["baseline_over_bare"] = step_s["baseline"] / step_s["bare"]
    for mode in steps:
        result[f"{mode}_samples_per_s"] = micro_batch / step_s[mode]
    if world.is_main:
        print(report(result, args.workers))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {args.out}")


def report(result: dict, workers: int) -> str:
    step_s = result["step_s"]
    lines = [(f"MGN benchmark ({result['preset']}, {result['device']}, {result['precision']}, "
              f"{result['torch_threads']} threads, micro-batch {result['micro_batch']})")]
    shapes, text = result["shapes"], result["text_model"]
    lines.append(f"  shapes: {shapes['image_model']} at {shapes['image_size']} px, {shapes['seq_len']} "
                 "tokens, fusion "
                 f"{shapes['fusion_dim']}; text encoder {text.get('architecture', text.get('name'))}"
                 f"{' (random-init stand-in)' if text.get('stand_in') else ''}")
    plain = ("bare", "baseline", "guided", "guided_cached", "guided_blocks")
    for mode, label in zip(plain, ("bare PyTorch step", "baseline step", "guided step", "guided, cached text",
                                   "guided, text blocks")):
        if mode in step_s:
            lines.append(f"  {label:<19} {step_s[mode] * 1e3:8.1f} ms  "
                         f"({result[f'{mode}_samples_per_s']:.1f} "
                         f"samples/s)")
    if "baseline_over_bare" in result:
        lines.append(f"  baseline / bare = {result['baseline_over_bare']:.3f}  (goal <= 1.05)")
    cached = result.get("guided_cached_over_baseline")
    cached = f", {cached:.2f} with cached text" if cached else ""
    blocks = result.get("guided_blocks_over_baseline")
    blocks = f", {blocks:.2f} with text blocks" if blocks else ""
    lines.append(f"  guided / baseline = {result['guided_over_baseline']:.2f} cold (every caption "
                 f"encoded){cached}"
                 f"{blocks}  (goal <= 1.5)")
    for name, seconds in result.get("components_s", {}).items():
        lines.append(f"    part {name:<14} {seconds * 1e3:8.1f} ms  ({100 * seconds / step_s['guided']:.0f}% "
                     "of the "
                     f"guided step)")
    if "text_forward_ms_per_sample" in result:
        lines.append(f"  text forward, ms per sample: {result['text_forward_ms_per_sample']:.4f} "
                     f"(autocast {result['text_forward_autocast']})")
    for mode in step_s:
        if mode not in plain:
            lines.append(f"  {mode:<19} {step_s[mode] * 1e3:8.1f} ms  "
                         f"({step_s[mode] / step_s['baseline']:.2f} x baseline, cached text)")
    lines.append(f"  data wait with {workers} workers: {100 * result['data_wait_fraction']:.1f}% of step "
                 "time "
                 f"(goal < 5%)")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except distributed.DeviceError as error:  # no GPU where one was asked for: one line, not a traceback
        sys.exit(f"train_step.py: error: {error}")
