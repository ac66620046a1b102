#!/usr/bin/env bash
# GPU acceptance check: the project's real entry points on one GPU, each step time-boxed, JSON out.
#
#   bash benchmarks/gpu_check.sh                      # one GPU, under 8 minutes; writes runs/gpu_check-*/
#   bash benchmarks/gpu_check.sh --bundle gpu_bundle  # the GPU test machine (no network): first installs
#                                                     # benchmarks/gpu_check_prepare.sh's folder offline
#   bash benchmarks/gpu_check.sh --out /tmp/check     # output folder of your choice
#   bash benchmarks/gpu_check.sh --results DIR        # also copy JSON, logs, pictures (no weights) to DIR
#   bash benchmarks/gpu_check.sh --limits             # print the steps' time limits and their sum, and stop
#   bash benchmarks/gpu_check.sh --cpu                # the same steps on CPU, tiny sizes (CI: < 5 minutes)
#
# Steps (GPU mode; --cpu: tiny preset, fp32, tiny benchmark settings, everything on the CPU):
#   setup            with --bundle: its wheels installed offline into OUT/site, on PYTHONPATH for every step;
#                    then the text encoders, with random weights (the bundle carries none): the demo's MiniLM
#                    in OUT/text/minilm and train_step's DistilBERT-sized stand-in
#   env              torch, CUDA, NCCL, DeepSpeed and every module the steps import, as this process sees
#                    them; fails without a working GPU or when a module does not import
#   train_demo       python train.py --preset demo --train.epochs 2 --train.device cuda --train.precision bf16
#                    --model.text_model OUT/text/minilm: DeepSpeed over NCCL, world size 1, synthetic shards
#                    in the output folder, two evaluations with attention pictures, the export
#   evaluate_device  python evaluate.py --ckpt <the demo run> --device cuda
#   evaluate_cpu     python evaluate.py --ckpt <the demo run> --device cpu (agrees with the GPU evaluation?)
#   bench_s0_bf16, bench_s0_fp32, bench_s4_bf16, bench_s4_fp32
#                    python benchmark.py --model mobileone_sN: batch-1 latency, ms/img at batch 256 beside the
#                    paper's 0.13 ms/img (MobileOne-S4, V100), end to end from pinned host memory, tf32 row
#   host_syncs       python benchmarks/host_syncs.py: the training loop's waits for the GPU, per update, counted
#                    with torch.cuda.set_sync_debug_mode (baseline and guided); fails on any beyond the one
#                    lagged read of the update's flags
#   train_step       python benchmarks/train_step.py --preset paper: baseline, bare PyTorch, guided, guided
#                    with cached text and with precomputed text blocks, and the guided step's parts, at the
#                    paper's shapes (MobileOne-S4 at 224 px, 121 tokens, fusion 1,024) with a random-init
#                    DistilBERT-sized text encoder (no download), the loader's data wait at that rate, and
#                    the text forward alone under the training step's bf16 autocast ("text forward, ms per
#                    sample")
#
# Each step runs under `timeout` and leaves steps/<name>.json (command, exit code, seconds, status, key
# figures), logs/<name>.log and its tool's own JSON; summary.json holds every step's pass/fail and duration.
# The script goes on after a failed step (a step whose input is missing is skipped), prints a table, and exits
# 1 if any step did not pass. No network: HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1.
# Environment: PYTHON (default python, else python3), GPU_CHECK_WORKERS (train_step's loader workers on GPU,
# default 8).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

MODE="gpu"
OUT=""
BUNDLE=""
RESULTS=""
LIMITS_ONLY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) MODE="cpu"; shift ;;
        --out|--bundle|--results)
            [[ $# -ge 2 ]] || { echo "gpu_check.sh: $1 needs a folder" >&2; exit 2; }
            case "$1" in --out) OUT="$2" ;; --bundle) BUNDLE="$2" ;; --results) RESULTS="$2" ;; esac
            shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        --bundle=*) BUNDLE="${1#--bundle=}"; shift ;;
        --results=*) RESULTS="${1#--results=}"; shift ;;
        --limits) LIMITS_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The GPU test machine has a plain python3 and may have no `python`.
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"

if [[ "$MODE" == "gpu" ]]; then
    DEVICE="cuda"
    # The whole check must end within BUDGET_S (8 minutes) on the GPU test machine, setup (the offline
    # install, the random-weight text encoders) included and the machine's own start-up aside. The limits
    # below add up to 30 + 20 + 85 + 25 + 25 + 4 x 35 + 25 + 70 = 420 s = STEPS_MAX_S (checked below), and
    # `timeout` kills a step at most KILL_AFTER_S = 5 s after its limit: even if all 11 steps ran to their
    # limits the check would end after 420 + 11 x 5 = 475 s, plus about a second of bookkeeping: inside 480 s.
    # Each limit is about twice what its step should take on an H100 at these sizes. No GPU has measured them
    # yet; the estimates come from the CPU side, measured here: 3-8 s of imports per process, 8 s for setup's
    # text encoders and 9 s for the 1,024 paper shards on one core, 7 s for the 2,400 demo shards. So: setup
    # ~15 s, env ~10 s, train_demo ~40 s (2 epochs of ~60 steps, not the preset's 8), each evaluation ~12 s,
    # each benchmark ~15 s (one batch size, 30 batch-1 calls per model, no unfused reference row), host_syncs
    # ~15 s (two tiny runs of 10 updates in one process), train_step ~50 s (5 steps x 2 rounds, not 10 x 3). A
    # step that outgrows its limit shows as "timeout", with its log.
    BUDGET_S=480
    STEPS_MAX_S=420
    T_SETUP=30 T_ENV=20 T_TRAIN=85 T_EVAL_DEVICE=25 T_EVAL_CPU=25 T_BENCH=35 T_SYNC=25 T_STEP=70
    TRAIN_ARGS=(--preset demo --train.epochs 2 --train.device cuda --train.precision bf16)
    DEMO_SHARDS_NAME="demo"
    # ms/img at batch 256 (the paper's figure is a throughput one); GPU defaults otherwise (cuDNN autotuning,
    # TF32 off for fp32 with a separate tf32 row, end to end from pinned memory)
    BENCH_ARGS=(--device cuda --batch-sizes 256 --channels-last --warmup 5 --iters 30 --rounds 3
                --throughput-iters 10 --no-compare-unfused)
    BENCH_S0=(--model mobileone_s0)
    BENCH_S4=(--model mobileone_s4)
    STANDIN="distilbert"
    STEP_SHARDS_NAME="paper"
    STEP_ARGS=(--preset paper --device cuda --synthetic-samples 1024 --random-text-encoder "$STANDIN"
               --workers "${GPU_CHECK_WORKERS:-8}" --steps 5 --rounds 2 --warmup 2)
else
    DEVICE="cpu"
    BUDGET_S=300
    STEPS_MAX_S=1200  # ceilings for a loaded CI machine; the run itself takes about two minutes
    T_SETUP=90 T_ENV=60 T_TRAIN=150 T_EVAL_DEVICE=90 T_EVAL_CPU=90 T_BENCH=90 T_SYNC=90 T_STEP=150
    TRAIN_ARGS=(--preset tiny --train.device cpu --train.precision fp32)
    DEMO_SHARDS_NAME="tiny"
    BENCH_ARGS=(--device cpu --tiny --batch-sizes 8)
    BENCH_S0=(--model mobileone_s0)
    BENCH_S4=(--model mobileone_s4 --image-size 64)
    STANDIN="tiny"
    STEP_SHARDS_NAME="tiny"  # the demo step's
    STEP_ARGS=(--preset tiny --device cpu --random-text-encoder "$STANDIN" --workers 1 --steps 2 --rounds 1
               --warmup 1)
fi
KILL_AFTER_S=5
LIMITS=("setup $T_SETUP" "env $T_ENV" "train_demo $T_TRAIN" "evaluate_device $T_EVAL_DEVICE"
        "evaluate_cpu $T_EVAL_CPU" "bench_s0_bf16 $T_BENCH" "bench_s0_fp32 $T_BENCH" "bench_s4_bf16 $T_BENCH"
        "bench_s4_fp32 $T_BENCH" "host_syncs $T_SYNC" "train_step $T_STEP")
STEPS_S=$(printf '%s\n' "${LIMITS[@]}" | awk '{ s += $2 } END { print s }')
if [[ "$LIMITS_ONLY" == 1 ]]; then
    printf '%s\n' "${LIMITS[@]}"
    echo "sum $STEPS_S (at most $STEPS_MAX_S; whole check budget $BUDGET_S, $MODE mode)"
    exit 0
fi
if (( STEPS_S > STEPS_MAX_S )); then
    echo "gpu_check.sh: the steps' limits add up to $STEPS_S s, over $STEPS_MAX_S s ($MODE mode)" >&2
    exit 2
fi
if [[ -n "$BUNDLE" ]]; then
    [[ -f "$BUNDLE/requirements.txt" ]] || { echo "gpu_check.sh: no $BUNDLE/requirements.txt: run" \
        "benchmarks/gpu_check_prepare.sh where there is a network, and bring its folder" >&2; exit 2; }
    BUNDLE="$(cd "$BUNDLE" && pwd)"
fi

if [[ -z "$OUT" ]]; then
    OUT="$ROOT/runs/gpu_check-$(date +%Y%m%d-%H%M%S)-$MODE"
fi
mkdir -p "$OUT/steps" "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [[ -n "$BUNDLE" ]]; then
    # the bundle's packages, installed by the setup step, for every step (and their loader workers)
    mkdir -p "$OUT/site"
    export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi

RUN="$OUT/runs/demo"
DEMO_SHARDS="$OUT/shards/$DEMO_SHARDS_NAME"
TEXT="$OUT/text/minilm"  # written by the setup step: the demo's text encoder, random weights

STEP_NAMES=()

# run_step NAME TIMEOUT_S ARTIFACT -- COMMAND...: time-boxed, logged, recorded in steps/NAME.json
run_step() {
    local name="$1" limit="$2" artifact="$3"
    shift 4
    STEP_NAMES+=("$name")
    local log="$OUT/logs/$name.log" start end rc
    printf '%-16s running (limit %ss) ...\n' "$name" "$limit"
    start="$(date +%s.%N)"
    if timeout --kill-after="$KILL_AFTER_S" "$limit" "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
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

run_step setup "$T_SETUP" "$OUT/setup.json" -- \
    "$PY" benchmarks/gpu_check_report.py setup --out "$OUT" ${BUNDLE:+--bundle "$BUNDLE"} --standin "$STANDIN"

run_step env "$T_ENV" "$OUT/env.json" -- \
    "$PY" benchmarks/gpu_check_report.py environment --device "$DEVICE" --out "$OUT/env.json"

if [[ -e "$TEXT/config.json" ]]; then
    run_step train_demo "$T_TRAIN" "$RUN/summary.json" -- \
        "$PY" train.py "${TRAIN_ARGS[@]}" --model.text_model "$TEXT" --train.output_dir "$OUT/runs" \
        --train.run_name demo --data.train_shards "$DEMO_SHARDS/train-*.tar" \
        --data.test_shards "$DEMO_SHARDS/test-*.tar"
else
    skip_step train_demo "setup wrote no text encoder ($TEXT)"
fi

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

if [[ -e "$TEXT/config.json" ]]; then
    run_step host_syncs "$T_SYNC" "$OUT/host_syncs.json" -- \
        "$PY" benchmarks/host_syncs.py --device "$DEVICE" --text-model "$TEXT" --out "$OUT/host_syncs.json"
else
    skip_step host_syncs "setup wrote no text encoder ($TEXT)"
fi

# the stand-in text encoder is read from beside --out, where setup built it (train_step.py's own builder would
# need the packaged MiniLM)
if [[ -e "$OUT/train_step/text-standin-$STANDIN/config.json" ]]; then
    run_step train_step "$T_STEP" "$OUT/train_step/train_step.json" -- \
        "$PY" benchmarks/train_step.py "${STEP_ARGS[@]}" --shards "$OUT/shards/$STEP_SHARDS_NAME" \
        --modes baseline,bare,guided,guided_cached,guided_blocks --components \
        --out "$OUT/train_step/train_step.json"
else
    skip_step train_step "setup wrote no stand-in text encoder ($OUT/train_step/text-standin-$STANDIN)"
fi

CHECK_END="$(date +%s.%N)"
status=0
"$PY" benchmarks/gpu_check_report.py summary --out "$OUT" --mode "$MODE" --budget "$BUDGET_S" \
    --seconds "$(awk -v a="$CHECK_START" -v b="$CHECK_END" 'BEGIN { printf "%.1f", b - a }')" \
    --steps "${STEP_NAMES[@]}" || status=$?

if [[ -n "$RESULTS" ]]; then
    # what a report needs, small enough to bring back from a machine: JSON, logs, pictures; not the installed
    # packages, text encoders, shards, checkpoints or exported weights
    mkdir -p "$RESULTS"
    (cd "$OUT" && find . \( -path ./site -o -path ./text -o -path ./shards -o -name 'text-standin-*' \
        -o -name checkpoints \) -prune -o -type f \( -name '*.json' -o -name '*.log' -o -name '*.png' \) \
        -size -1024k -print0 | xargs -0 -r cp --parents -t "$RESULTS")
    echo "copied the results (JSON, logs, pictures) to $RESULTS"
fi
exit "$status"
