"""The Python half of benchmarks/gpu_check.sh (and of gpu_check_prepare.sh): setup, the environment step,
and the verdict on every step.

    python benchmarks/gpu_check_report.py bundle-text --out gpu_bundle/text       # gpu_check_prepare.sh
    python benchmarks/gpu_check_report.py setup --out DIR [--bundle gpu_bundle] --standin distilbert
    python benchmarks/gpu_check_report.py environment --device cuda --out env.json
    python benchmarks/gpu_check_report.py summary --out DIR --mode gpu --budget 480 --seconds 412 --steps env
    ...

`setup` installs the bundle's wheels offline into DIR/site (with a bundle: the GPU test machine lacks them)
and writes the text encoders the steps use, with random weights: DIR/text/minilm (the demo's MiniLM) and the
DistilBERT-sized stand-in that benchmarks/train_step.py --random-text-encoder reads from DIR/train_step/.
`summary` reads DIR/steps/<name>.json (what the shell recorded: command, exit code, seconds, timeout) and the
JSON each step's tool wrote, decides pass / fail / timeout / skipped with the reason, adds the step's key
figures to its steps/<name>.json, writes DIR/summary.json, prints a table, and exits 1 unless every step
passed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The paper's shapes (mgn.config defaults) that the GPU run of train_step must have timed.
PAPER_SHAPES = {"image_model": "mobileone_s4", "image_size": 224, "seq_len": 121, "fusion_dim": 1024,
                "text_hidden": 768}
BENCH_BATCH = {"gpu": 256, "cpu": 8}  # the largest throughput batch gpu_check.sh asks benchmark.py for
EVAL_TOLERANCE = 0.01  # evaluate on the device vs on the CPU: accuracy within this (or two samples)
# The packaged MiniLM's files that are not weights: what the bundle carries of it (its weights are 91 MB).
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.txt")
# What the check's steps import (the bundle's packages and what they and the project take to be there): one
# that fails to import fails the environment step, rather than a step later.
REQUIRED_MODULES = ("torch", "deepspeed", "pydantic", "hjson", "webdataset", "braceexpand", "psutil",
                    "transformers", "tokenizers", "timm", "safetensors", "numpy", "sklearn", "scipy",
                    "matplotlib", "PIL", "yaml", "packaging", "tqdm")


# --- the bundle and the setup step -------------------------------------------------------------------------

def bundle_text(out: Path) -> int:
    """gpu_check_prepare.sh: the packaged MiniLM's config and tokenizer, without weights, into `out`."""
    copy_text_files(packaged_text_folder(), out)
    return 0


def packaged_text_folder() -> Path:
    sys.path.insert(0, str(ROOT))
    from mgn.config import PACKAGED_MINILM, resolve_text_model  # the project, found from ROOT

    return Path(resolve_text_model(PACKAGED_MINILM))


def copy_text_files(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        shutil.copy2(source / name, dest / name)


def requirement_lines(bundle: Path) -> list[str]:
    """The bundle's requirements.txt: name==version lines."""
    lines = (bundle / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def install_bundle(bundle: Path, target: Path, pip_args: Sequence[str] = ()) -> str:
    """Install the bundle's requirements offline into `target` from its wheels, and nothing else (--no-deps:
    the bundle's list is the whole closure beside what the machine has, which `missing_requirements` checks).
    `pip_args`: CI adds the GPU machine's interpreter and platform, to install what the machine would get.
    Without pip (a bare interpreter) the wheels are unpacked: zip files, laid out for a target folder."""
    wheels = bundle / "wheels"
    if importlib.util.find_spec("pip") is None:
        unpack_wheels(wheels, requirement_lines(bundle), target)
        return "unpacked (no pip)"
    # --isolated: no user-level pip settings of the machine's (--user, require-virtualenv) get in the way
    subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--quiet",
                    "--disable-pip-version-check", "--no-index", "--no-deps", "--find-links", str(wheels),
                    "--target", str(target), "-r", str(bundle / "requirements.txt"), *pip_args], check=True)
    return "pip install --no-index --no-deps --target"


def unpack_wheels(wheels: Path, requirements: list[str], target: Path) -> None:
    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    by_name = {(canonical(w.name.split("-")[0]), w.name.split("-")[1]): w for w in wheels.glob("*.whl")}
    for line in requirements:
        name, version = line.split("==")
        wheel = by_name.get((canonical(name), version))
        if wheel is None:
            raise FileNotFoundError(f"no wheel for {line} in {wheels}")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)


def missing_requirements(target: Path, assumed_present: Sequence[str],
                         python_version: str | None = None) -> list[str]:
    """What a package installed in `target` requires that is neither there (at a version that satisfies it)
    nor among `assumed_present`: what the machine would miss at import time. Markers are read for
    `python_version` on Linux (default: this interpreter's)."""
    from importlib.metadata import distributions

    from packaging.requirements import Requirement  # present wherever pip or transformers is
    from packaging.utils import canonicalize_name

    env = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "extra": ""}
    if python_version:
        env |= {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    dists = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[str(target)])}
    present = set(dists) | {canonicalize_name(name) for name in assumed_present}
    missing = []
    for name, dist in sorted(dists.items()):
        for req in map(Requirement, dist.requires or []):
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # another platform's, or an extra's
            needed = canonicalize_name(req.name)
            if needed not in present:
                missing.append(f"{name} needs {req}")
            elif needed in dists and not req.specifier.contains(dists[needed].version, prereleases=True):
                missing.append(f"{name} needs {req}, the bundle has {dists[needed].version}")
    return missing


def read_names(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def random_text_encoder(source: Path, dest: Path) -> dict:
    """`source`'s config and tokenizer in `dest`, with random weights (seed 0) written beside them: the shapes
    and cost of the encoder, without its 91 MB of weights to carry: for timing and plumbing, not accuracy."""
    import torch  # heavy: setup only
    from transformers import AutoConfig, AutoModel

    copy_text_files(source, dest)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(dest))
    model.save_pretrained(dest)
    return {"path": str(dest), "from": str(source), "architecture": model.config.model_type,
            "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters()), "weights": "random init (seed 0)"}


def train_step_standin(out: Path, kind: str, vocabulary: Path) -> dict:
    """The random-init encoder that benchmarks/train_step.py --random-text-encoder KIND reads from beside
    its --out (gpu_check.sh passes --out OUT/train_step/train_step.json), built here by train_step.py's own
    code with the tokenizer from `vocabulary`: built there, it would need the packaged MiniLM, which the GPU
    test machine does not have."""
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks" / "train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    folder = out / "train_step" / f"text-standin-{kind}"
    return train_step.build_text_standin(kind, folder, vocabulary=str(vocabulary))


def setup(out: Path, bundle: Path | None, standin: str) -> int:
    """The check's first step: the bundle's packages in OUT/site (the shell puts it on PYTHONPATH for every
    step), then the text encoders. Writes OUT/setup.json."""
    record: dict = {"bundle": str(bundle) if bundle else None, "problems": []}
    if bundle is not None:
        site = out / "site"
        record["site"] = str(site)
        record["install"] = install_bundle(bundle, site)
        record["installed"] = requirement_lines(bundle)
        record["problems"] += missing_requirements(site, read_names(bundle / "assumed-present.txt"))
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    source = bundle / "text" if bundle is not None else packaged_text_folder()
    record["text_encoder"] = random_text_encoder(source, out / "text" / "minilm")
    record["train_step_standin"] = train_step_standin(out, standin, out / "text" / "minilm")
    record["ok"] = not record["problems"]
    (out / "setup.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    for problem in record["problems"]:
        print(f"gpu_check: {problem}", file=sys.stderr)
    return 0 if record["ok"] else 1


# --- the environment step ----------------------------------------------------------------------------------

def environment(device: str, out: Path) -> int:
    import torch  # the check's first import of torch: it belongs to the step's time

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "torch_threads": torch.get_num_threads(), "asked_for": device}
    # Every module the steps import, with its version and where it came from (the bundle's OUT/site, or the
    # machine's own packages): one that fails here fails the check now, with its error, not a step later.
    problems = []
    env["modules"] = {}
    for name in REQUIRED_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # any failure (missing, binary mismatch, its own imports)
            env["modules"][name] = {"error": f"{type(error).__name__}: {error}"}
            problems.append(f"cannot import {name}: {type(error).__name__}: {error}")
            continue
        env["modules"][name] = {"version": getattr(module, "__version__", None),
                                "from": getattr(module, "__file__", None)}
    if "version" in env["modules"]["deepspeed"]:
        env["deepspeed"] = env["modules"]["deepspeed"]["version"]
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed picks its accelerator from what torch sees; "cpu" on a GPU machine means it saw no GPU
        env["deepspeed_accelerator"] = get_accelerator()._name
        if device == "cuda" and env["deepspeed_accelerator"] != "cuda":
            problems.append(f"DeepSpeed chose the {env['deepspeed_accelerator']!r} accelerator, not 'cuda'")
    else:
        env["deepspeed"] = f"import failed: {env['modules']['deepspeed']['error']}"
    if device == "cuda":
        if not torch.cuda.is_available():
            problems.append(f"CUDA is not available to torch {torch.__version__} (CUDA build "
                            f"{torch.version.cuda}): "
                            f"no driver, no GPU visible, or a CPU-only torch")
        else:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       compute_capability=f"{props.major}.{props.minor}",
                       cudnn=torch.backends.cudnn.version(),
                       bf16_supported=torch.cuda.is_bf16_supported(), driver=_nvidia_smi("driver_version"),
                       nccl_available=torch.distributed.is_nccl_available())
            try:
                env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception as error:
                env["nccl"] = f"unknown ({error})"
            x = torch.randn(256, 256, device="cuda")  # a kernel really runs: a broken install fails here
            env["matmul_on_gpu_ok"] = bool(torch.isfinite(x @ x).all().item())
            if not env["nccl_available"]:
                problems.append("torch was built without NCCL")
            if not env["bf16_supported"]:
                problems.append(f"{props.name} has no bf16 (train.precision=bf16 needs compute capability >= "
                                "8.0)")
    env["problems"] = problems
    env["ok"] = not problems
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    for problem in problems:
        print(f"gpu_check: {problem}", file=sys.stderr)
    return 0 if env["ok"] else 1


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True,
                             text=True, timeout=20, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# --- figures and checks of each step
# ------------------------------------------------------------------------- Each takes (the tool's JSON, the
# context) and returns (figures, failed checks, a one-line digest).

Verdict = tuple[dict, list[str], str]


def setup_figures(data: dict, ctx: dict) -> Verdict:
    text, standin = data["text_encoder"], data["train_step_standin"]
    figures = {"bundle": data["bundle"], "install": data.get("install"), "installed": data.get("installed"),
               "text_encoder": text["path"], "text_encoder_parameters": text["parameters"],
               "train_step_standin": standin["path"]}
    installed = f"{len(data['installed'])} packages installed offline, " if data.get("installed") else ""
    digest = (f"{installed}random-weight text encoders: {text['architecture']} "
              f"{text['layers']}x{text['hidden']} ({text['parameters'] / 1e6:.1f}M), train_step's "
              f"{standin['architecture']}")
    return figures, list(data.get("problems", [])), digest


def env_figures(data: dict, ctx: dict) -> Verdict:
    keys = ("torch", "torch_cuda", "cuda_available", "device_count", "gpu", "gpu_memory_gib",
            "compute_capability",
            "cudnn", "nccl", "bf16_supported", "driver", "deepspeed", "deepspeed_accelerator",
            "torch_threads")
    figures = {k: data[k] for k in keys if k in data}
    figures["versions"] = {name: m.get("version") for name, m in data.get("modules", {}).items()}
    where = f"{data.get('gpu')}, CUDA {data.get('torch_cuda')}, NCCL {data.get('nccl')}" if data.get("gpu") \
        else f"CPU, {data.get('torch_threads')} torch threads"
    return figures, list(data.get("problems", [])), f"torch {data.get('torch')}, {where}"


def train_figures(data: dict, ctx: dict) -> Verdict:
    run = Path(ctx["artifact"]).parent
    cfg = json.loads((run / "config.json").read_text())
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    train = cfg["train"]
    # what the run used, from its log (the config may say "auto"); the config's value where the log has no
    # such line
    device = _search(r"rank 0 on (\S+?),", log)
    precision = _search(r"precision (\w+)", log)
    source = "train.log" if device and precision else "train.log, config.json"
    device = device or (train["device"] if train["device"] != "auto" else None)
    precision = precision or (train["precision"] if train["precision"] != "auto" else None)
    samples = data["step"] * train["micro_batch"] * train["grad_accum"] * data["world_size"]
    figures = {"steps": data["step"], "epochs": data["epochs"], "world_size": data["world_size"],
               "device": device,
               "backend": ("nccl" if device and device.startswith("cuda") else "gloo") if device else None,
               "precision": precision, "device_and_precision_from": source,
               "train_seconds": data["train_seconds"],
               "samples_per_s": samples / data["train_seconds"] if data["train_seconds"] else None,
               "student_accuracy": data.get("student_accuracy"), "skipped_steps": data.get("skipped_steps"),
               "preset_model": cfg["model"]["image_model"], "image_size": cfg["model"]["image_size"],
               "student": data.get("student")}
    failed = []
    if data["world_size"] != 1:
        failed.append(f"world size {data['world_size']}, expected 1")
    if not device or not device.startswith(ctx["device"]):
        failed.append(f"trained on {device}, expected {ctx['device']}")
    if precision != ctx["precision"]:
        failed.append(f"precision {precision}, expected {ctx['precision']}")
    if not data.get("student") or not Path(data["student"]).exists():
        failed.append("no exported student")
    digest = (f"{data['step']} steps on {device} ({figures['backend']}), {precision}, "
              f"{figures['samples_per_s'] or 0:.0f} samples/s, student acc "
              f"{figures['student_accuracy'] or 0:.3f}")
    return figures, failed, digest


def eval_figures(data: dict, ctx: dict) -> Verdict:
    student = data["student"]
    fusion = data.get("fusion_check") or {}
    figures = {"device": data["device"], "samples": data["samples"], "seconds": data["seconds"],
               "accuracy": student["accuracy"], "auroc": student.get("auroc"), "f1": student.get("f1"),
               "fusion_max_abs_diff": fusion.get("max_abs_diff"),
               "fusion_agreement": fusion.get("prediction_agreement")}
    expected = "cpu" if ctx["name"] == "evaluate_cpu" else ctx["device"]
    failed = []
    if not str(data["device"]).startswith(expected):
        failed.append(f"evaluated on {data['device']}, expected {expected}")
    if not data["samples"]:
        failed.append("no test samples")
    other = ctx["results"].get("evaluate_device") if ctx["name"] == "evaluate_cpu" else None
    agree = ""
    if other and "accuracy" in other:
        diff = abs(other["accuracy"] - student["accuracy"])
        figures["accuracy_diff_vs_device"] = diff
        tolerance = max(EVAL_TOLERANCE, 2 / max(data["samples"], 1))
        if other["samples"] != data["samples"] or diff > tolerance:
            failed.append(f"CPU and {other['device']} evaluations disagree: accuracy "
                          f"{student['accuracy']:.4f} vs "
                          f"{other['accuracy']:.4f} on {data['samples']} vs {other['samples']} samples")
        agree = f", |acc - device's| {diff:.4f}"
    digest = (f"{data['samples']} samples on {data['device']}, acc {student['accuracy']:.4f}, "
              f"AUROC {student.get('auroc') or 0:.4f}, {data['seconds']:.1f} s{agree}")
    return figures, failed, digest


def bench_figures(data: dict, ctx: dict) -> Verdict:
    from_models = data["models"]
    fused = from_models["student, fused (deployed)"]
    big = data.get("largest_batch") or {}
    e2e = (data.get("end_to_end") or {}).get("inputs", {})
    figures = {"variant": data["model"]["variant"], "image_size": data["model"]["image_size"],
               "precision": data["settings"]["precision"], "math": data["settings"]["math"],
               "device": data["settings"]["device"], "channels_last": data["settings"]["channels_last"],
               "latency_ms_batch1_p50": fused["latency_ms_batch1"]["p50"],
               "plain_latency_ms_batch1_p50": from_models["plain timm, fused"]["latency_ms_batch1"]["p50"],
               "student_over_plain_p50": data["ratios"]["student_over_plain_p50"],
               "end_to_end_uint8_ms_batch1_p50": e2e.get("uint8", {}).get("latency_ms_batch1", {}).get("p50"),
               "batch": big.get("batch"), "ms_per_img": big.get("ms_per_img"),
               "images_per_s": big.get("images_per_s"),
               "tf32_ms_per_img": big.get("tf32_ms_per_img"),
               "end_to_end_uint8_ms_per_img": big.get("end_to_end_uint8_ms_per_img"),
               "end_to_end_float_ms_per_img": big.get("end_to_end_float_ms_per_img"),
               "paper_ms_per_img": (big.get("paper") or {}).get("ms_per_img"),
               "over_paper": big.get("over_paper"),
               "comparable_to_paper": big.get("comparable_to_paper")}
    failed = []
    if not str(figures["device"]).startswith(ctx["device"]):
        failed.append(f"timed on {figures['device']}, expected {ctx['device']}")
    if figures["batch"] != BENCH_BATCH[ctx["mode"]]:
        failed.append(f"largest batch timed {figures['batch']}, expected {BENCH_BATCH[ctx['mode']]}")
    tf32 = f", tf32 {figures['tf32_ms_per_img']:.4f}" if figures["tf32_ms_per_img"] else ""
    paper = (f" ({figures['over_paper']:.2f}x paper's {figures['paper_ms_per_img']})"
             if figures["comparable_to_paper"] else "")
    digest = (f"b1 {figures['latency_ms_batch1_p50']:.2f} ms; {figures['ms_per_img'] or 0:.4f} ms/img at "
              f"{figures['batch']}{paper}{tf32}; e2e uint8 {figures['end_to_end_uint8_ms_per_img'] or 0:.4f}")
    return figures, failed, digest


def train_step_figures(data: dict, ctx: dict) -> Verdict:
    step_ms = {mode: 1e3 * s for mode, s in data["step_s"].items()}
    text = data.get("text_model", {})
    figures = {"device": data["device"], "precision": data["precision"], "micro_batch": data["micro_batch"],
               "shapes": data.get("shapes"), "text_model": text, "step_ms": step_ms,
               "guided_over_baseline": data["guided_over_baseline"],
               "guided_cached_over_baseline": data.get("guided_cached_over_baseline"),
               "guided_blocks_over_baseline": data.get("guided_blocks_over_baseline"),
               "components_share_of_guided": data.get("components_share_of_guided"),
               "baseline_over_bare": data.get("baseline_over_bare"), "loader_workers": data["loader_workers"],
               "data_wait_fraction": data["data_wait_fraction"],
               "guided_samples_per_s_with_loader": data["guided_samples_per_s_with_loader"],
               "text_forward_ms_per_sample": data.get("text_forward_ms_per_sample"),
               "text_forward_autocast": data.get("text_forward_autocast")}
    failed = []
    if not str(data["device"]).startswith(ctx["device"]):
        failed.append(f"timed on {data['device']}, expected {ctx['device']}")
    if ctx["mode"] == "gpu":
        wrong = {k: (data.get("shapes", {}).get(k), v) for k, v in PAPER_SHAPES.items()
                 if data.get("shapes", {}).get(k) != v}
        if wrong:
            failed.append(f"not the paper's shapes: {wrong} (got, expected)")
    # the text forward is timed under the training step's autocast: bf16 on the GPU, none in --cpu's fp32
    expected_autocast = "bfloat16" if ctx["precision"] == "bf16" else "off"
    if figures["text_forward_ms_per_sample"] is None:
        failed.append("no text forward time (train_step.py --components)")
    elif figures["text_forward_autocast"] != expected_autocast:
        failed.append(f"text forward timed under autocast {figures['text_forward_autocast']}, "
                      f"training uses {expected_autocast}")
    prepared = (ctx["results"].get("setup") or {}).get("train_step_standin")
    if prepared and text.get("path") != prepared:
        failed.append(f"timed the text encoder {text.get('path') or text.get('name')}, not setup's "
                      f"{prepared}")
    digest = (f"guided/baseline {data['guided_over_baseline']:.2f} (cached "
              f"{data.get('guided_cached_over_baseline') or 0:.2f}, text blocks "
              f"{data.get('guided_blocks_over_baseline') or 0:.2f}), baseline/bare "
              f"{data.get('baseline_over_bare') or 0:.2f}, data wait {100 * data['data_wait_fraction']:.1f}% "
              f"({data['loader_workers']} workers), text forward "
              f"{figures['text_forward_ms_per_sample'] or 0:.4f} ms per sample")
    return figures, failed, digest


def host_sync_figures(data: dict, ctx: dict) -> Verdict:
    """benchmarks/host_syncs.py: calls that made the host wait for the device in the training loop's hot
    path."""
    figures = {r["objective"]: {"updates": r["updates"], "host_syncs": r["host_syncs"],
                                "lagged_flag_reads": r["lagged_flag_reads"], "first_syncs": r["first_syncs"]}
               for r in data["objectives"]}
    failed = [f"{name}: {f['host_syncs']} host syncs in {f['updates']} updates' hot loop (first: "
              f"{', '.join(f['first_syncs'][:3])})" for name, f in figures.items() if f["host_syncs"]]
    if data["device"] != ctx["device"]:
        failed.append(f"counted on {data['device']}, expected {ctx['device']}")
    digest = ", ".join(f"{name} {f['host_syncs']} syncs + {f['lagged_flag_reads']} lagged reads in "
                       f"{f['updates']} "
                       f"updates" for name, f in figures.items())
    return figures, failed, digest


FIGURES: dict[str, Callable[[dict, dict], Verdict]] = {
    "setup": setup_figures, "env": env_figures, "train_demo": train_figures, "evaluate_device": eval_figures,
    "evaluate_cpu": eval_figures, "host_syncs": host_sync_figures,
    "train_step": train_step_figures}


def _search(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def _last_line(step: dict, width: int = 160) -> str:
    """': <the log's last line>', the error a failed command printed last."""
    try:
        lines = [line.strip() for line in Path(step["log"]).read_text(errors="replace").splitlines()
                 if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:width]}" if lines else ""


def judge(step: dict, ctx: dict) -> dict:
    """The step's status, reason, figures and digest, from its record and its tool's JSON."""
    if step.get("status") == "skipped":
        return step
    if step["timed_out"]:
        return {**step, "status": "timeout",
                "reason": f"killed after {step['timeout_s']} s{_last_line(step)}"}
    if step["exit_code"] != 0:
        return {**step, "status": "fail", "reason": f"exit code {step['exit_code']}{_last_line(step)}"}
    artifact = Path(step["artifact"]) if step.get("artifact") else None
    if artifact is None or not artifact.exists():
        return {**step, "status": "fail", "reason": f"exit code 0 but no {artifact}"}
    extract = FIGURES.get(step["name"]) or (bench_figures if step["name"].startswith("bench_") else None)
    try:
        figures, failed, digest = extract(json.loads(artifact.read_text()), {**ctx, "name": step["name"],
                                                                             "artifact": str(artifact)})
    except (KeyError, TypeError, ValueError, OSError) as error:
        return {**step, "status": "fail", "reason": f"{artifact}: unexpected content "
                                                    f"({type(error).__name__}: {error})"}
    ctx["results"][step["name"]] = figures
    status = {"status": "fail", "reason": "; ".join(failed)} if failed else {"status": "pass"}
    return {**step, **status, "figures": figures, "digest": digest}


def summary(out: Path, mode: str, budget: float, seconds: float, names: list[str]) -> int:
    env_file = out / "env.json"
    ctx = {"mode": mode, "device": "cuda" if mode == "gpu" else "cpu",
           "precision": "bf16" if mode == "gpu" else "fp32",
           "results": {}}
    steps = []
    for name in names:
        path = out / "steps" / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else \
            {"name": name, "status": "fail", "reason": f"no record {path}", "seconds": 0.0}
        if "exit_code" in record:  # ran (a skipped step's record says why it did not)
            record = judge(record, ctx)
        path.write_text(json.dumps(record, indent=2) + "\n")
        steps.append(record)
    passed = all(s["status"] == "pass" for s in steps)
    counts = {status: sum(s["status"] == status for s in steps) for status in ("pass", "fail", "timeout",
                                                                               "skipped")}
    result = {"mode": mode, "out": str(out), "passed": passed, "counts": counts, "seconds": seconds,
              "budget_s": budget, "within_budget": seconds <= budget,
              "environment": json.loads(env_file.read_text()) if env_file.exists() else None,
              "text_forward": text_forward(ctx["results"]),
              "steps": [{k: s.get(k) for k in ("name", "status", "reason", "seconds", "timeout_s",
                                               "exit_code",
                                               "digest", "figures", "artifact", "log")} for s in steps]}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0 if passed else 1


def text_forward(results: dict) -> dict | None:
    """The figure docs/training.md's scale estimate needs: the frozen text encoder's forward alone, ms per
    sample, under the training step's autocast, with what it was timed on."""
    step = results.get("train_step") or {}
    if step.get("text_forward_ms_per_sample") is None:
        return None
    text, shapes = step["text_model"], step.get("shapes") or {}
    return {"ms_per_sample": step["text_forward_ms_per_sample"], "autocast": step["text_forward_autocast"],
            "text_model": text.get("architecture") or text.get("name"), "stand_in": text.get("stand_in"),
            "seq_len": shapes.get("seq_len"), "micro_batch": step["micro_batch"],
            "device": (results.get("env") or {}).get("gpu") or step["device"]}


def table(result: dict) -> str:
    lines = [f"{'step':<16}{'status':<9}{'time':>7}{'limit':>7}  key figures", "-" * 100]
    for s in result["steps"]:
        limit = f"{s['timeout_s']}s" if s.get("timeout_s") else "-"
        detail = s.get("digest") or ""
        if s["status"] != "pass":
            detail = f"{s.get('reason')}" + (f" | {detail}" if detail else "")
        lines.append(f"{s['name']:<16}{s['status']:<9}{s.get('seconds') or 0:>6.0f}s{limit:>7}  {detail}")
    c = result["counts"]
    budget = "" if result["within_budget"] else "  WARNING: over the time budget"
    lines.append(f"total {result['seconds']:.0f} s (budget {result['budget_s']:.0f} s){budget}; "
                 f"{c['pass']}/{len(result['steps'])} passed, {c['fail']} failed, {c['timeout']} timed out, "
                 f"{c['skipped']} skipped -> {'PASS' if result['passed'] else 'FAIL'}")
    text = result.get("text_forward")
    if text:
        stand_in = ", random-init stand-in" if text["stand_in"] else ""
        lines.append(f"text forward, ms per sample: {text['ms_per_sample']:.4f} ({text['text_model']}"
                     f"{stand_in}, {text['seq_len']} tokens, micro-batch {text['micro_batch']}, autocast "
                     f"{text['autocast']}, {text['device']})")
    lines.append(f"wrote {result['out']}/summary.json and steps/*.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    text = sub.add_parser("bundle-text")
    text.add_argument("--out", type=Path, required=True)
    setup_ = sub.add_parser("setup")
    setup_.add_argument("--out", type=Path, required=True)
    setup_.add_argument("--bundle", type=Path, default=None, help="gpu_check_prepare.sh's folder")
    setup_.add_argument("--standin", required=True, help="train_step.py's --random-text-encoder")
    env = sub.add_parser("environment")
    env.add_argument("--device", choices=["cuda", "cpu"], required=True)
    env.add_argument("--out", type=Path, required=True)
    summ = sub.add_parser("summary")
    summ.add_argument("--out", type=Path, required=True)
    summ.add_argument("--mode", choices=["gpu", "cpu"], required=True)
    summ.add_argument("--budget", type=float, required=True)
    summ.add_argument("--seconds", type=float, required=True)
    summ.add_argument("--steps", nargs="+", required=True)
    args = parser.parse_args(argv)
    if args.command == "bundle-text":
        return bundle_text(args.out)
    if args.command == "setup":
        return setup(args.out, args.bundle, args.standin)
    if args.command == "environment":
        return environment(args.device, args.out)
    return summary(args.out, args.mode, args.budget, args.seconds, args.steps)


if __name__ == "__main__":
    sys.exit(main())
