#!/usr/bin/env bash
# The GPU run: everything flaxnets claims for GPUs, measured on one CUDA device in one go.
#
#   bash benchmarks/gpu_run.sh --out DIR [--steps a,b,...] [--data-dir PATH] [--dry-run]   (from the checkout's root)
#
# Needs jax with its CUDA plugin, flax, optax, orbax-checkpoint, chex, numpy, scikit-learn, pillow, tqdm,
# matplotlib, and torch + torchvision for the conversion check; not tensorflow-datasets nor Grain. The
# project itself is installed without dependencies (nothing is downloaded). Fashion-MNIST's four IDX .gz
# files must be in --data-dir (default data/fashion_mnist, which git ignores): copy them there first, e.g.
#   mkdir -p data && cp -r ../shared/datasets/fashion_mnist data/
#
# Steps, each its own process under its own time limit (`python -m benchmarks.gpu limits`), each writing
# DIR/STEP.json and DIR/STEP.log, in this order: environment, correctness, parallel, tune, peers, accuracy,
# pipeline, throughput (benchmarks/gpu/__init__.py says what each measures); --steps runs some of them, in
# that order. Then the table of results (DIR/summary.md) and DIR/results.tgz, which holds every step's
# .json and .log and the table. A step that ends early hands its unused seconds to the next. --dry-run:
# every step at toy sizes on the CPU (a minute or two).
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
out="" data_dir="data/fashion_mnist" dry=() steps=()
while (( $# )); do
    case "$1" in
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --data-dir) data_dir="${2:?--data-dir needs a folder}"; shift 2 ;;
        --dry-run) dry=(--dry-run); shift ;;
        --steps) steps=(--steps "${2:?--steps needs a comma-separated list}"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)." >&2; exit 2 ;;
    esac
done
[[ -n "$out" ]] || { echo "error: --out DIR is required (see --help)." >&2; exit 2; }
[[ -f pyproject.toml && -d benchmarks && -d train ]] || { echo "error: run this from the checkout's root." >&2; exit 2; }
# $PYTHON, else the checkout's own .venv (as the README sets it up), else python3 from the PATH.
python="${PYTHON:-}"
[[ -n "$python" ]] || { [[ -x .venv/bin/python ]] && python=.venv/bin/python; } || python=python3
mkdir -p "$out" && rm -rf "$out/xla-cache"  # compile times are measured from an empty cache
# The checkout comes first on the path whether or not the install below works.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export JAX_COMPILATION_CACHE_DIR="$out/xla-cache"  # empty at first; tune reuses what throughput compiled

if (( ${#dry[@]} )) && "$python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('flaxnets') is None)" 2>/dev/null; then
    echo "install: skipped (dry run, flaxnets already importable)"
elif ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "install: skipped (no pip here; the steps import the checkout directly)"
else
    # --no-build-isolation: setuptools from this environment, no download.
    timeout 30 "$python" -m pip install --quiet --no-deps --no-build-isolation -e . \
        || echo "install: pip failed; the steps import the checkout directly"
fi

names=() limits=()  # in the order they run
while read -r step seconds; do names+=("$step") limits+=("$seconds"); done \
    < <("$python" -m benchmarks.gpu limits "${dry[@]}" "${steps[@]}")
(( ${#names[@]} )) || { echo "error: $python cannot run benchmarks.gpu (see --help)." >&2; exit 2; }
grace=15 saved=0 codes=()
for i in "${!names[@]}"; do
    step=${names[$i]}
    seconds=$(( limits[i] + saved ))
    echo "== $step (at most ${seconds} s) =="
    started=$SECONDS
    timeout -k 10 "$seconds" "$python" -m benchmarks.gpu "$step" --out "$out" --budget $(( seconds - grace )) \
        --data-dir "$data_dir" "${dry[@]}" 2>&1 | tee "$out/$step.log"
    code=${PIPESTATUS[0]}
    codes+=("$step=$code")
    saved=$(( seconds - (SECONDS - started) ))
    (( saved > 0 )) || saved=0
done
echo
"$python" -m benchmarks.gpu summary --out "$out" --codes "${codes[@]}" "${dry[@]}" "${steps[@]}"
# Everything a report needs in one small file (the accuracy runs' checkpoints and the compilation cache
# stay behind): what to bring back from a machine that returns only a few files.
(cd "$out" && tar czf results.tgz --exclude='*.tmp' -- *.json *.log summary.md) \
    && echo "results: $out/results.tgz"
