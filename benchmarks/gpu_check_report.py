"""The Python half of benchmarks/gpu_check.sh: the environment step, and the verdict on every step.

    python benchmarks/gpu_check_report.py environment --device cuda --out env.json
    python benchmarks/gpu_check_report.py summary --out DIR --mode gpu --budget 480 --seconds 412 --steps env ...

`summary` reads DIR/steps/<name>.json (what the shell recorded: command, exit code, seconds, timeout) and the
JSON each step's tool wrote, decides pass / fail / timeout / skipped with the reason, adds the step's key
figures to its steps/<name>.json, writes DIR/summary.json, prints a table, and exits 1 unless every step passed.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# The paper's shapes (mgn.config defaults) that the GPU run of train_step must have timed.
PAPER_SHAPES = {"image_model": "mobileone_s4", "image_size": 224, "seq_len": 121, "fusion_dim": 1024,
                "text_hidden": 768}
BENCH_BATCH = {"gpu": 256, "cpu": 8}  # the largest throughput batch gpu_check.sh asks benchmark.py for
EVAL_TOLERANCE = 0.01  # evaluate on the device vs on the CPU: accuracy within this (or two samples)


# --- the environment step ----------------------------------------------------------------------------------

def environment(device: str, out: Path) -> int:
    import torch  # noqa: PLC0415 - the check's first import of torch: it belongs to the step's time

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "torch_threads": torch.get_num_threads(), "asked_for": device}
    try:
        import deepspeed  # noqa: PLC0415

        env["deepspeed"] = deepspeed.__version__
    except Exception as error:  # noqa: BLE001 - reported, and the training step fails on it too
        env["deepspeed"] = f"import failed: {error}"
    problems = []
    if device == "cuda":
        if not torch.cuda.is_available():
            problems.append(f"CUDA is not available to torch {torch.__version__} (CUDA build {torch.version.cuda}): "
                            f"no driver, no GPU visible, or a CPU-only torch")
        else:
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                       bf16_supported=torch.cuda.is_bf16_supported(), driver=_nvidia_smi("driver_version"),
                       nccl_available=torch.distributed.is_nccl_available())
            try:
                env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception as error:  # noqa: BLE001
                env["nccl"] = f"unknown ({error})"
            x = torch.randn(256, 256, device="cuda")  # a kernel really runs: a broken install fails here
            env["matmul_on_gpu_ok"] = bool(torch.isfinite(x @ x).all().item())
            if not env["nccl_available"]:
                problems.append("torch was built without NCCL")
            if not env["bf16_supported"]:
                problems.append(f"{props.name} has no bf16 (train.precision=bf16 needs compute capability >= 8.0)")
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
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# --- figures and checks of each step -------------------------------------------------------------------------
# Each takes (the tool's JSON, the context) and returns (figures, failed checks, a one-line digest).

Verdict = tuple[dict, list[str], str]


def env_figures(data: dict, ctx: dict) -> Verdict:
    keys = ("torch", "torch_cuda", "cuda_available", "device_count", "gpu", "gpu_memory_gib", "compute_capability",
            "cudnn", "nccl", "bf16_supported", "driver", "deepspeed", "torch_threads")
    figures = {k: data[k] for k in keys if k in data}
    where = f"{data.get('gpu')}, CUDA {data.get('torch_cuda')}, NCCL {data.get('nccl')}" if data.get("gpu") \
        else f"CPU, {data.get('torch_threads')} torch threads"
    return figures, list(data.get("problems", [])), f"torch {data.get('torch')}, {where}"


def train_figures(data: dict, ctx: dict) -> Verdict:
    run = Path(ctx["artifact"]).parent
    cfg = json.loads((run / "config.json").read_text())
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    train = cfg["train"]
    # what the run used, from its log (the config may say "auto"); the config's value where the log has no such line
    device = _search(r"rank 0 on (\S+?),", log)
    precision = _search(r"precision (\w+)", log)
    source = "train.log" if device and precision else "train.log, config.json"
    device = device or (train["device"] if train["device"] != "auto" else None)
    precision = precision or (train["precision"] if train["precision"] != "auto" else None)
    samples = data["step"] * train["micro_batch"] * train["grad_accum"] * data["world_size"]
    figures = {"steps": data["step"], "epochs": data["epochs"], "world_size": data["world_size"], "device": device,
               "backend": ("nccl" if device and device.startswith("cuda") else "gloo") if device else None,
               "precision": precision, "device_and_precision_from": source, "train_seconds": data["train_seconds"],
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
              f"{figures['samples_per_s'] or 0:.0f} samples/s, student acc {figures['student_accuracy'] or 0:.3f}")
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
            failed.append(f"CPU and {other['device']} evaluations disagree: accuracy {student['accuracy']:.4f} vs "
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
               "batch": big.get("batch"), "ms_per_img": big.get("ms_per_img"), "images_per_s": big.get("images_per_s"),
               "tf32_ms_per_img": big.get("tf32_ms_per_img"),
               "end_to_end_uint8_ms_per_img": big.get("end_to_end_uint8_ms_per_img"),
               "end_to_end_float_ms_per_img": big.get("end_to_end_float_ms_per_img"),
               "paper_ms_per_img": (big.get("paper") or {}).get("ms_per_img"), "over_paper": big.get("over_paper"),
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
               "guided_samples_per_s_with_loader": data["guided_samples_per_s_with_loader"]}
    failed = []
    if not str(data["device"]).startswith(ctx["device"]):
        failed.append(f"timed on {data['device']}, expected {ctx['device']}")
    if ctx["mode"] == "gpu":
        wrong = {k: (data.get("shapes", {}).get(k), v) for k, v in PAPER_SHAPES.items()
                 if data.get("shapes", {}).get(k) != v}
        if wrong:
            failed.append(f"not the paper's shapes: {wrong} (got, expected)")
    digest = (f"guided/baseline {data['guided_over_baseline']:.2f} (cached "
              f"{data.get('guided_cached_over_baseline') or 0:.2f}, text blocks "
              f"{data.get('guided_blocks_over_baseline') or 0:.2f}), baseline/bare "
              f"{data.get('baseline_over_bare') or 0:.2f}, data wait {100 * data['data_wait_fraction']:.1f}% "
              f"({data['loader_workers']} workers)")
    return figures, failed, digest


FIGURES: dict[str, Callable[[dict, dict], Verdict]] = {
    "env": env_figures, "train_demo": train_figures, "evaluate_device": eval_figures, "evaluate_cpu": eval_figures,
    "train_step": train_step_figures}


def _search(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def _last_line(step: dict, width: int = 160) -> str:
    """': <the log's last line>', the error a failed command printed last."""
    try:
        lines = [line.strip() for line in Path(step["log"]).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:width]}" if lines else ""


def judge(step: dict, ctx: dict) -> dict:
    """The step's status, reason, figures and digest, from its record and its tool's JSON."""
    if step.get("status") == "skipped":
        return step
    if step["timed_out"]:
        return {**step, "status": "timeout", "reason": f"killed after {step['timeout_s']} s{_last_line(step)}"}
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
        return {**step, "status": "fail", "reason": f"{artifact}: unexpected content ({type(error).__name__}: {error})"}
    ctx["results"][step["name"]] = figures
    status = {"status": "fail", "reason": "; ".join(failed)} if failed else {"status": "pass"}
    return {**step, **status, "figures": figures, "digest": digest}


def summary(out: Path, mode: str, budget: float, seconds: float, names: list[str]) -> int:
    env_file = out / "env.json"
    ctx = {"mode": mode, "device": "cuda" if mode == "gpu" else "cpu", "precision": "bf16" if mode == "gpu" else "fp32",
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
    counts = {status: sum(s["status"] == status for s in steps) for status in ("pass", "fail", "timeout", "skipped")}
    result = {"mode": mode, "out": str(out), "passed": passed, "counts": counts, "seconds": seconds,
              "budget_s": budget, "within_budget": seconds <= budget,
              "environment": json.loads(env_file.read_text()) if env_file.exists() else None,
              "steps": [{k: s.get(k) for k in ("name", "status", "reason", "seconds", "timeout_s", "exit_code",
                                               "digest", "figures", "artifact", "log")} for s in steps]}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0 if passed else 1


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
    lines.append(f"wrote {result['out']}/summary.json and steps/*.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
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
    if args.command == "environment":
        return environment(args.device, args.out)
    return summary(args.out, args.mode, args.budget, args.seconds, args.steps)


if __name__ == "__main__":
    sys.exit(main())
