#!/usr/bin/env bash
# Gather what the GPU test machine lacks (docs/benchmarks.md, "On the GPU test machine") into one git-ignored
# folder, so that `bash benchmarks/gpu_check.sh --bundle gpu_bundle` runs there with no network:
#
#   bash benchmarks/gpu_check_prepare.sh                  # -> gpu_bundle/ at the repository root (~6.4 MiB)
#   bash benchmarks/gpu_check_prepare.sh --out DIR        # elsewhere
#
# The folder holds
#   wheels/            wheels for CPython 3.12, manylinux x86-64, of every package the check needs that the
#                      machine lacks (it has Python 3.12.3 and torch 2.11, and no registry to install from);
#                      deepspeed has only a source package, so its wheel is built here (pure Python)
#   requirements.txt   those packages, pinned: gpu_check.sh installs exactly these, offline, in a folder
#   assumed-present.txt  what the bundled packages need that the machine is taken to have already
#   text/              the packaged MiniLM's config and tokenizer, without its 91 MB of weights: gpu_check.sh
#                      writes random weights beside them there (timing and plumbing only, never accuracy)
# and must stay under 64 MiB (what travels with the working tree): the script prints its size and fails above.
# It needs the project's environment (bash install.sh) and the registry. CI runs it (tests/test_gpu_check.py)
# and installs the folder offline for Python 3.12, so that a missing wheel shows there and not on the GPU.
# Environment: PYTHON (default python).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/gpu_bundle"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out)
            [[ $# -ge 2 ]] || { echo "gpu_check_prepare.sh: --out needs a folder" >&2; exit 2; }
            OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check_prepare.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python}"
LIMIT_BYTES=$((64 * 1024 * 1024))

# What the machine lacks: the project's own missing requirements (versions pinned in requirements.txt) and
# what they need in turn (versions: this environment's, which the project's tests ran with).
#   deepspeed: py-cpuinfo, ninja, msgpack, einops and hjson are bundled, being small and possibly absent;
#     psutil too (a wrong guess would stop deepspeed's import). numpy, packaging, tqdm and torch are assumed
#     present (torch is preinstalled; transformers needs the other three). deepspeed 0.19.8 does not require
#     nvidia-ml-py.
#   pydantic: pydantic-core, annotated-types, typing-inspection, and typing-extensions (>= 4.16, newer than
#     torch asks for, so the machine's may be too old).
#   webdataset: braceexpand; pyyaml is assumed present (transformers and timm need it).
PINNED=(deepspeed webdataset psutil)
FROM_ENV=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson braceexpand
          py-cpuinfo ninja msgpack einops)
ASSUMED_PRESENT=(torch numpy packaging tqdm pyyaml)

# name==version for each package: requirements.txt's pin, else the installed version
requirements="$("$PY" - "$ROOT/requirements.txt" "${PINNED[*]}" "${FROM_ENV[*]}" <<'PYEOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
path, pinned, from_env = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", open(path).read(), re.M))
missing = [name for name in pinned if name not in pins]
if missing:
    sys.exit(f"gpu_check_prepare.sh: no pin for {missing} in {path}")
for name in pinned:
    print(f"{name}=={pins[name]}")
for name in from_env:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"gpu_check_prepare.sh: {name} is not installed here: run bash install.sh first")
PYEOF
)"

echo "gpu_check_prepare.sh: gathering into $OUT"
rm -rf "$OUT/wheels" "$OUT/text"  # stale wheels of other versions would be installed too
mkdir -p "$OUT/wheels" "$OUT/text"
OUT="$(cd "$OUT" && pwd)"

# Binary wheels for the machine, not for this one: CPython 3.12, manylinux x86-64. --no-deps: the list above
# is the whole closure (CI checks it: tests/test_gpu_check.py).
grep -v '^deepspeed==' <<<"$requirements" | xargs "$PY" -m pip download --quiet --disable-pip-version-check \
    --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --no-deps -d "$OUT/wheels"
# deepspeed: built here from its source package, with no compiled ops (DS_BUILD_OPS=0), so that the wheel is
# pure Python and imports under the machine's torch; --no-cache-dir: a cached build may have had ops.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --no-build-isolation -w "$OUT/wheels" "$(grep '^deepspeed==' <<<"$requirements")"
if ! compgen -G "$OUT/wheels/deepspeed-*-py3-none-any.whl" >/dev/null; then
    echo "gpu_check_prepare.sh: the deepspeed wheel is not pure Python:" \
         "$(ls "$OUT/wheels" | grep deepspeed)" >&2
    exit 1
fi

{
    echo "# Installed offline on the GPU test machine by gpu_check.sh --bundle (made by gpu_check_prepare.sh)"
    echo "$requirements"
} >"$OUT/requirements.txt"
{
    echo "# Needed by the bundled packages and taken to be on the GPU test machine already (gpu_check.sh's"
    echo "# env step imports them). One name a line."
    printf '%s\n' "${ASSUMED_PRESENT[@]}"
} >"$OUT/assumed-present.txt"

# the packaged MiniLM's config and tokenizer files, not its weights (gpu_check_report.py's TEXT_FILES)
"$PY" "$ROOT/benchmarks/gpu_check_report.py" bundle-text --out "$OUT/text"

bytes="$(du -sb "$OUT" | cut -f1)"
echo "gpu_check_prepare.sh: $(ls "$OUT/wheels" | wc -l) wheels, $(ls "$OUT/text" | wc -l) text encoder" \
     "files; $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB in $OUT (limit 64 MiB)"
if (( bytes > LIMIT_BYTES )); then
    echo "gpu_check_prepare.sh: $OUT is over 64 MiB: it would not travel with the working tree" >&2
    exit 1
fi
