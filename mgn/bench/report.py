"""The text report of `python benchmark.py`: the table and lines printed from its JSON result.

    format_report(result) -> the printed report: what ran where, the checks, the latency and throughput table,
                             the ratios, the matmul peak, end to end, and throughput beside the paper's figure

Apart from the timing (mgn/bench/latency.py) because it reads only the JSON result: it imports no torch, and a
saved result can be printed again without timing anything. The names of the timed models are here because
they are the result's keys, the rows of this table.
"""
from __future__ import annotations

# The timed models, by their name in the result (its "models" keys) and the rows of the table.
STUDENT_UNFUSED, STUDENT_FUSED, PLAIN_FUSED = ("student, unfused", "student, fused (deployed)",
                                               "plain timm, fused")
STUDENT_TF32 = "student, fused, tf32"
CLIP_TOWER = "CLIP zero-shot (image tower)"


def format_report(r: dict) -> str:
    lines = [*heading_lines(r), *check_lines(r), *table_lines(r), *ratio_lines(r),
             *end_to_end_lines(r.get("end_to_end")), *largest_batch_lines(r.get("largest_batch"))]
    return "\n".join(lines)


def warning_text(r: dict) -> str:
    """Why the figures may not be representative: a busy CPU, or unstable timings (empty if neither)."""
    s, env = r["settings"], r["environment"]
    load = max(env.get("load_average_1min_start") or 0, env.get("load_average_1min") or 0)
    busy = (f"\nWARNING: 1-min load average reached {load} while this run used {s['torch_threads']} threads "
            "on "
            f"{env.get('cpus_usable', env['cpu_count'])} CPUs: other processes shared the cores, so the CPU "
            f"figures are not representative"
            if env["device_type"] == "cpu" and load > s["torch_threads"] + 0.5 else "")
    spread = max(e["latency_ms_batch1"]["p99"] / e["latency_ms_batch1"]["p50"] for e in r["models"].values())
    if spread > 3:
        busy += (f"\nWARNING: unstable timings (p99 up to {spread:.1f}x p50): something else ran during the "
                 f"measurement; rerun on a quiet machine")
    return busy


def heading_lines(r: dict) -> list[str]:
    """What was timed, in which precision and options, on which machine; where the weights came from."""
    s, env, m = r["settings"], r["environment"], r["model"]
    where = (f"{env.get('gpu')} (driver {env.get('driver')}, CUDA {env.get('cuda')})"
             if env["device_type"] == "cuda"
             else f"CPU {env['cpu']}, {s['torch_threads']} torch "
                  f"thread{'s' if s['torch_threads'] != 1 else ''}")
    options = f"{', channels_last' if s['channels_last'] else ''}{', torch.compile' if s['compile'] else ''}"
    if env["device_type"] == "cuda":
        options += f", cudnn.benchmark {'on' if s.get('cudnn_benchmark') else 'off'}"
    return [(f"MGN benchmark: {m['variant']} + head, {m['num_classes']} classes, {m['image_size']} px, "
             f"{s['precision']}{options} on {where}"),
            f"weights: {m['weights']}{warning_text(r)}", f"math: {s['math']}",
            *[f"note: {n}" for n in m["notes"]]]


def check_lines(r: dict) -> list[str]:
    """The equivalence checks made before timing."""
    eq, m, lines = r["equivalence"], r["model"], []
    if "fused_vs_unfused" in eq:
        e = eq["fused_vs_unfused"]
        lines.append(f"check fused vs unfused: max |diff| {e['max_abs_diff']:.2e} on logits up to "
                     f"{e['max_abs_logit']:.3g}"
                     f" (relative {e['relative']:.1e} <= {e['rtol']:g}) {'OK' if e['ok'] else 'FAIL'}")
    if "reduced_precision_vs_fp32" in eq:
        e = eq["reduced_precision_vs_fp32"]
        lines.append(f"{e['precision']} vs fp32 (fused student): max |diff| {e['max_abs_diff']:.2e} on "
                     "logits up to "
                     f"{e['max_abs_logit']:.3g}, same class: {e['same_argmax']}")
    e = eq["student_vs_plain"]
    lines.append(f"check student vs plain timm {m['variant']}: max |diff| {e['max_abs_diff']:.2e} "
                 f"{'OK' if e['ok'] else 'FAIL'}")
    return lines


def table_lines(r: dict) -> list[str]:
    """One row per timed model: batch-1 latency, throughput at each batch size, FLOPs and the share of
    peak."""
    s = r["settings"]
    batches = s["batch_sizes"]
    header = (f"{'model':<28}{'p50 ms':>9}{'p90':>8}{'p99':>8}{'trim.mean':>10}"
              + "".join(f"{f'img/s@{b}':>11}" for b in batches)
              + f"{'GFLOP/img':>10}{'GFLOP/s':>9}{'% peak':>8}")
    lines = ["batch-1 latency over {} calls per model (interleaved in {} rounds), throughput at larger "
             "batches:".format(
        s["iters"], s["rounds"]), header, "-" * len(header)]
    for name, e in r["models"].items():
        lat = e["latency_ms_batch1"]
        row = f"{name:<28}{lat['p50']:>9.2f}{lat['p90']:>8.2f}{lat['p99']:>8.2f}{lat['trimmed_mean']:>10.2f}"
        row += "".join(f"{p['images_per_s']:>11.1f}" if "images_per_s" in p else f"{'OOM':>11}"
                       for p in e["throughput"])
        row += (f"{e['flops_per_image'] / 1e9:>10.3f}{e['achieved_gflops_batch1']:>9.1f}"
                f"{100 * e['fraction_of_matmul_peak_batch1']:>7.1f}%")
        lines.append(row)
    return lines


def ratio_lines(r: dict) -> list[str]:
    """The latency ratios between the rows, with their noise floor, and the matmul peak the rows are set
    against."""
    ratios, m, lines = r["ratios"], r["model"], []
    if "unfused_over_fused_p50" in ratios:
        lines.append(f"fused speed-up over unfused (p50): {ratios['unfused_over_fused_p50']:.2f}x")
    if "student_over_clip_p50" in ratios:
        lines.append(f"student / CLIP image tower latency (p50): {ratios['student_over_clip_p50']:.3f}; CLIP "
                     "runs at "
                     f"{r['models'][CLIP_TOWER]['image_size']} px, the student at {m['image_size']} px")
    lines.append(f"student / plain timm latency: {ratios['student_over_plain_p50']:.2f} (p50), "
                 f"{ratios['student_over_plain_trimmed_mean']:.2f} (trimmed mean); noise: the student's own "
                 "p50 moves "
                 f"by {ratios['student_p50_half_to_half']:.2f}x between halves of its samples")
    peak = r["matmul_peak"]
    tf32 = f" ({peak['tf32']['gflops']:.1f} with TF32, for the tf32 row)" if "tf32" in peak else ""
    lines.append(f"matmul peak ({peak['dtype']} {peak['size']}x{peak['size']}, same device and threads): "
                 f"{peak['gflops']:.1f} GFLOP/s{tf32}; GFLOP/s and % peak above are at batch 1 (p50)")
    return lines


def end_to_end_lines(e2e: dict | None) -> list[str]:
    if not e2e:
        return []
    lines = [f"end to end, {e2e['model']} ({e2e['includes']}):"]
    for kind, entry in e2e["inputs"].items():
        lat = entry["latency_ms_batch1"]
        points = "".join(f", {p['ms_per_img']:.4f} ms/img at {p['batch']} ({p['over_model_only']:.2f}x model "
                         "only)"
                         if "over_model_only" in p else f", batch {p['batch']}: {p.get('error', 'n/a')}"
                         for p in entry["throughput"])
        lines.append(f"  from {kind:<5}: batch 1 p50 {lat['p50']:.2f} ms "
                     f"({entry['latency_over_model_only_p50']:.2f}x "
                     f"model only){points}")
    return lines


def largest_batch_lines(big: dict | None) -> list[str]:
    """ms/img at the largest batch that ran, beside the paper's throughput figure (none if no batch ran)."""
    if not big:
        return []
    paper = big["paper"]
    extra = "".join(f", {label} {big[key]:.4f}" for key, label in (
        ("tf32_ms_per_img", "tf32"), ("end_to_end_uint8_ms_per_img", "end to end from uint8"),
        ("end_to_end_float_ms_per_img", "end to end from float")) if key in big)
    return [f"throughput at batch {big['batch']} ({big['precision']}): {big['ms_per_img']:.4f} ms/img "
            f"({big['images_per_s']:.0f} img/s){extra}; paper: {paper['ms_per_img']} ms/img for "
            f"MobileOne-S4 at {paper['image_size']} px on a V100 (a throughput figure) -> "
            f"{big['over_paper']:.2f}x the paper's"
            + ("" if big["comparable_to_paper"] else f" [not comparable: {big['note']}]")]
