#!/usr/bin/env bash
# The streamed input pipeline's figures on a GPU host, in about 150 s, from the checkout's root:
#   1. images/s of benchmarks.input_pipeline from original-size ImageNet-like JPEGs and from their copy at
#      shorter side 256 (python -m train.data prepare folder), beside a plain multiprocessing decoding loop;
#   2. benchmarks.stream_train: the trainer's ResNet-50 step fed by the copy, against the same step on a
#      batch resident on the GPU (the share of the step's speed the pipeline delivers);
#   3. a short python -m train run streaming the copy, its images/s read from its progress lines.
# Targets (16 cores): >= 5,000 images/s from originals, >= 10,000 from the copy, streamed >= 90% of resident.
#
#   bash benchmarks/gpu_pipeline.sh OUT              # OUT: a folder for the JSON files and logs
#   bash benchmarks/gpu_pipeline.sh OUT --dry-run    # toy sizes, on a CPU: checks the script itself
#   bash benchmarks/gpu_pipeline.sh OUT --no-train   # steps 1 and 2 only (stream_train is the steady figure)
#
# Grain and array_record, when not importable, are installed from the wheels in .whl/ (python -m pip download
# of grain, array-record and portpicker for the host's Python) into /tmp/site; nothing is fetched. The
# images live in ${TMPDIR:-/tmp}, not in OUT. Each step runs under its own time limit and the script goes
# on after a failure; OUT/summary.json gathers what each step measured.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_pipeline.sh OUT [--dry-run] [--no-train]}
mode="" train=1
for option in "${@:2}"; do
  case "$option" in
    --dry-run) mode=--dry-run ;;
    --no-train) train=0 ;;
    *) echo "error: unknown option $option (the options are --dry-run and --no-train)." >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
data=${TMPDIR:-/tmp}/flaxnets-gpu-pipeline
started=$SECONDS

if [ "$mode" = "--dry-run" ]; then
  images=40; workers=$(nproc); batch=4; batches=4; segments=5; repeats=1; side=64
  arch=lenet5_relu; dtype=float32; train_batch=8; size=(--image-size 32); steps=4; epochs=2
  limits=(60 90 60)
else
  images=4000; workers=$(nproc); batch=64; batches=32; segments=5; repeats=1; side=224
  arch=resnet50; dtype=bfloat16; train_batch=256; size=(); steps=30; epochs=3
  limits=(55 60 35)
fi

if ! "$python" -c "import grain, array_record" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$out/install.log" 2>&1 || { echo "error: the wheels in .whl/ do not install (see $out/install.log)." >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" - > "$out/environment.json" <<'EOF'
import json, os, platform
from importlib import metadata
names = ("grain", "array-record", "pillow", "opencv-python-headless", "numpy", "jax", "jaxlib", "flax")
versions = {}
for name in names:
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
print(json.dumps({"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                  "versions": versions}, indent=1))
EOF
echo "environment: $(tr -d '\n' < "$out/environment.json")"

mkdir -p "$data"
echo "== input pipeline: $images JPEGs and their copy at 256, $workers workers, batch $batch"
timeout "${limits[0]}" "$python" -m benchmarks.input_pipeline --folder "$data/originals" --images "$images" \
  --workers "$workers" --batch "$batch" --batches "$batches" --segments "$segments" --repeats "$repeats" --side "$side" \
  --json "$out/input_pipeline.json" 2>&1 | tee "$out/input_pipeline.log" | grep -v "leaked shared_memory\|warnings.warn"

echo "== $arch fed by the copy against the resident batch"
timeout "${limits[1]}" "$python" -m benchmarks.stream_train --data-dir "$data/originals-s256" --arch "$arch" \
  --dtype "$dtype" --batch-size "$train_batch" --workers "$workers" --steps "$steps" ${size[@]+"${size[@]}"} \
  --json "$out/stream_train.json" 2>&1 | tee "$out/stream_train.log" | grep -v "leaked shared_memory\|warnings.warn"

# The same flags as stream_train's run (a constant rate among them), so the step comes from the compilation cache.
rm -rf "$data/train"
if [ "$train" = 1 ]; then
echo "== python -m train streaming the copy"
# Each output line gets the time it arrived, so the rate between progress lines can be read afterwards.
timeout "${limits[2]}" "$python" -m train --arch "$arch" --dtype "$dtype" --batch-size "$train_batch" \
  --dataset folder --data-dir "$data/originals-s256" --pipeline stream --workers "$workers" ${size[@]+"${size[@]}"} \
  --epochs "$epochs" --schedule constant --warmup-epochs 0 --log-every-steps 5 --no-plots --mean 0.485,0.456,0.406 \
  --std 0.229,0.224,0.225 --workdir "$data/train" 2>&1 \
  | "$python" -u -c 'import sys, time
for line in sys.stdin:
    print(f"{time.time():.3f} {line}", end="", flush=True)' > "$out/train.log"
cp "$data/train/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null
fi

"$python" - "$out" "$train_batch" "$((SECONDS - started))" <<'EOF'
import json, os, re, sys
out, wall = sys.argv[1], int(sys.argv[3])
def load(name):
    try:
        with open(os.path.join(out, name)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
summary = {"wall_s": wall, "environment": load("environment.json"), "input_pipeline": load("input_pipeline.json"),
           "stream_train": load("stream_train.json")}
# The trainer's epochs (the first compiles; later ones start with what the workers read ahead during the
# evaluation, so on a small copy stream_train's ratio is the steady figure) and its timestamped progress lines.
log = os.path.join(out, "train.log")
lines = re.findall(r"^(\d+\.\d+) step (\d+)/\d+", open(log).read(), re.M) if os.path.exists(log) else []
epochs = []
if os.path.exists(os.path.join(out, "train_metrics.jsonl")):
    epochs = [json.loads(line) for line in open(os.path.join(out, "train_metrics.jsonl")) if line.strip()]
summary["train"] = {"progress": [(float(t), int(s)) for t, s in lines],
                    "epochs": [{k: e.get(k) for k in ("epoch", "images_per_sec", "epoch_time_s")} for e in epochs]}
heads = []
for row in (summary["input_pipeline"] or {}).get("rows", []):
    heads.append(f"{row['data']}: {row['images_per_sec']:,.0f} images/s (plain loop {row.get('plain_images_per_sec', 0):,.0f})")
if summary["stream_train"]:
    s = summary["stream_train"]
    heads.append(f"streamed {s['streamed_images_per_sec']:,.0f} of resident {s['synthetic_images_per_sec']:,.0f} images/s "
                 f"({s['streamed_of_synthetic']:.0%})")
if len(epochs) > 1:
    later = ", ".join(f"{e['images_per_sec']:,.0f}" for e in epochs[1:])
    heads.append(f"python -m train epochs after the first: {later} images/s")
summary["headline"] = "; ".join(heads) or "nothing measured: see the logs"
with open(os.path.join(out, "summary.json"), "w") as handle:
    json.dump(summary, handle, indent=1)
print(summary["headline"])
print(f"{wall} s; results in {out}")
EOF
