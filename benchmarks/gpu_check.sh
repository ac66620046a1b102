#!/usr/bin/env bash
# GPU acceptance check: the project's real entry points on one GPU, each step time-boxed, JSON out.
#
#   bash benchmarks/gpu_check.sh                      # one GPU, under 8 minutes; writes runs/gpu_check-*/
#   bash benchmarks/gpu_check.sh --out /tmp/check     # output folder of your choice
#   bash benchmarks/gpu_check.sh --cpu                # the same steps on CPU with tiny sizes (CI: < 5 minutes)
#
# Steps (GPU mode; --cpu: tiny preset, fp32, tiny benchmark settings, everything on the CPU):
#   env              torch, CUDA, NCCL, DeepSpeed as this process sees them; fails without a working GPU
#   train_demo       python train.py --preset demo --train.device cuda --train.precision bf16: DeepSpeed over NCCL,
#                    world size 1, synthetic shards in the output folder
#   evaluate_device  python evaluate.py --ckpt <the demo run> --device cuda
#   evaluate_cpu     python evaluate.py --ckpt <the demo run> --device cpu (agrees with the GPU evaluation?)
#   bench_s0_bf16, bench_s0_fp32, bench_s4_bf16, bench_s4_fp32
#                    python benchmark.py --model mobileone_sN: batch-1 latency, ms/img at batch 256 beside the
#                    paper's 0.13 ms/img (MobileOne-S4, V100), end to end from pinned host memory, tf32 row (fp32)
#   train_step       python benchmarks/train_step.py --preset paper: baseline, bare PyTorch, guided, guided with
#                    cached text and with precomputed text blocks, and the guided step's parts, at the paper's shapes (MobileOne-S4 at 224 px, 121 tokens, fusion 1,024) with a
#                    random-init DistilBERT-sized text encoder (no download), and the loader's data wait at that rate
#
# Each step runs under `timeout` and leaves steps/<name>.json (command, exit code, seconds, status, key figures),
# logs/<name>.log and its tool's own JSON; summary.json holds every step's pass/fail and duration. The script
# goes on after a failed step (a step whose input is missing is skipped), prints a table, and exits 1 if any
# step did not pass. No network: HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1.
# Environment: PYTHON (default python), GPU_CHECK_WORKERS (train_step's loader workers on GPU, default 8).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

MODE="gpu"
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) MODE="cpu"; shift ;;
        --out) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
if [[ -z "$OUT" ]]; then
    OUT="$ROOT/runs/gpu_check-$(date +%Y%m%d-%H%M%S)-$MODE"
fi
mkdir -p "$OUT/steps" "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

RUN="$OUT/runs/demo"
if [[ "$MODE" == "gpu" ]]; then
    DEVICE="cuda"
    BUDGET_S=480
    # step timeouts in seconds (their sum is above the budget: each one is a ceiling, not an estimate)
    T_ENV=60 T_TRAIN=240 T_EVAL_DEVICE=90 T_EVAL_CPU=120 T_BENCH=120 T_STEP=240
    TRAIN_ARGS=(--preset demo --train.device cuda --train.precision bf16)
    DEMO_SHARDS="$OUT/shards/demo"
    # ms/img at batch 256 (the paper's figure is a throughput one); GPU defaults otherwise (cuDNN autotuning,
    # TF32 off for fp32 with a separate tf32 row, end to end from pinned memory)
    BENCH_ARGS=(--device cuda --batch-sizes 256 --channels-last)
    BENCH_S0=(--model mobileone_s0)
    BENCH_S4=(--model mobileone_s4)
    STEP_ARGS=(--preset paper --device cuda --shards "$OUT/shards/paper" --synthetic-samples 1024
               --random-text-encoder distilbert --workers "${GPU_CHECK_WORKERS:-8}" --steps 10 --rounds 3 --warmup 3)
else
    DEVICE="cpu"
    BUDGET_S=300
    T_ENV=60 T_TRAIN=150 T_EVAL_DEVICE=90 T_EVAL_CPU=90 T_BENCH=90 T_STEP=150
    TRAIN_ARGS=(--preset tiny --train.device cpu --train.precision fp32)
    DEMO_SHARDS="$OUT/shards/tiny"
    BENCH_ARGS=(--device cpu --tiny --batch-sizes 8)
    BENCH_S0=(--model mobileone_s0)
    BENCH_S4=(--model mobileone_s4 --image-size 64)
    STEP_ARGS=(--preset tiny --device cpu --shards "$DEMO_SHARDS" --random-text-encoder tiny --workers 1
               --steps 2 --rounds 1 --warmup 1)
fi

STEP_NAMES=()

# run_step NAME TIMEOUT_S ARTIFACT -- COMMAND...: time-boxed, logged, recorded in steps/NAME.json
run_step() {
    local name="$1" limit="$2" artifact="$3"
    shift 4
    STEP_NAMES+=("$name")
    local log="$OUT/logs/$name.log" start end rc
    printf '%-16s running (limit %ss) ...\n' "$name" "$limit"
    start="$(date +%s.%N)"
    if timeout --kill-after=20 "$limit" "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
    end="$(date +%s.%N)"
    record "$name" "$rc" "$start" "$end" "$limit" "$artifact" "$log" "$@"
    if [[ "$rc" -ne 0 ]]; then
        printf '%-16s exit code %s; last lines of %s:\n' "$name" "$rc" "$log"
        tail -n 5 "$log" | sed 's/^/    /'
    fi
}

# skip_step NAME WHY: a step that cannot run because what it needs is missing
skip_step() {
    STEP_NAMES+=("$1")
    printf '%-16s skipped: %s\n' "$1" "$2"
    "$PY" - "$OUT/steps/$1.json" "$1" "$2" <<'PYEOF'
import json, sys
path, name, why = sys.argv[1:4]
json.dump({"name": name, "status": "skipped", "reason": why, "seconds": 0.0}, open(path, "w"), indent=2)
PYEOF
}

record() {
    local name="$1" rc="$2" start="$3" end="$4" limit="$5" artifact="$6" log="$7"
    shift 7
    "$PY" - "$OUT/steps/$name.json" "$name" "$rc" "$start" "$end" "$limit" "$artifact" "$log" "$@" <<'PYEOF'
import json, sys
path, name, rc, start, end, limit, artifact, log, *command = sys.argv[1:]
json.dump({"name": name, "command": command, "exit_code": int(rc), "seconds": round(float(end) - float(start), 2),
           "timeout_s": int(limit), "timed_out": int(rc) in (124, 137), "artifact": artifact or None, "log": log},
          open(path, "w"), indent=2)
PYEOF
}

echo "MGN GPU acceptance check ($MODE mode) -> $OUT"
CHECK_START="$(date +%s.%N)"

run_step env "$T_ENV" "$OUT/env.json" -- \
    "$PY" benchmarks/gpu_check_report.py environment --device "$DEVICE" --out "$OUT/env.json"

run_step train_demo "$T_TRAIN" "$RUN/summary.json" -- \
    "$PY" train.py "${TRAIN_ARGS[@]}" --train.output_dir "$OUT/runs" --train.run_name demo \
    --data.train_shards "$DEMO_SHARDS/train-*.tar" --data.test_shards "$DEMO_SHARDS/test-*.tar"

if [[ -e "$RUN/checkpoints/latest" ]]; then
    run_step evaluate_device "$T_EVAL_DEVICE" "$OUT/evaluate_device/eval.json" -- \
        "$PY" evaluate.py --ckpt "$RUN" --device "$DEVICE" --out "$OUT/evaluate_device"
    run_step evaluate_cpu "$T_EVAL_CPU" "$OUT/evaluate_cpu/eval.json" -- \
        "$PY" evaluate.py --ckpt "$RUN" --device cpu --out "$OUT/evaluate_cpu"
else
    skip_step evaluate_device "train_demo left no checkpoint ($RUN/checkpoints/latest)"
    skip_step evaluate_cpu "train_demo left no checkpoint ($RUN/checkpoints/latest)"
fi

for variant in s0 s4; do
    if [[ "$variant" == "s0" ]]; then model=("${BENCH_S0[@]}"); else model=("${BENCH_S4[@]}"); fi
    for precision in bf16 fp32; do
        json="$OUT/benchmark/${variant}_${precision}.json"
        run_step "bench_${variant}_${precision}" "$T_BENCH" "$json" -- \
            "$PY" benchmark.py "${model[@]}" "${BENCH_ARGS[@]}" --precision "$precision" --out "$json"
    done
done

run_step train_step "$T_STEP" "$OUT/train_step/train_step.json" -- \
    "$PY" benchmarks/train_step.py "${STEP_ARGS[@]}" --modes baseline,bare,guided,guided_cached,guided_blocks \
    --components --out "$OUT/train_step/train_step.json"

CHECK_END="$(date +%s.%N)"
"$PY" benchmarks/gpu_check_report.py summary --out "$OUT" --mode "$MODE" --budget "$BUDGET_S" \
    --seconds "$(awk -v a="$CHECK_START" -v b="$CHECK_END" 'BEGIN { printf "%.1f", b - a }')" \
    --steps "${STEP_NAMES[@]}"
