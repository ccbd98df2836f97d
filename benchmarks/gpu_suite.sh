#!/usr/bin/env bash
# The GPU benchmark suite, for a lent GPU machine. Run from the repository root (or anywhere):
#
#   benchmarks/gpu_suite.sh                # CUDA machine: the full suite, within 9 minutes
#   benchmarks/gpu_suite.sh --cpu-dry-run  # the same script with CPU backends and tiny sizes (tests, CI)
#
# What it does, each stage under a time limit so the whole run ends within the budget
# (GPU_SUITE_BUDGET_S, default 510 s; a stage that would start too late is skipped and said so):
#   1. checks what is present: torch CUDA, onnxruntime-gpu (CUDA provider), tensorrt, the server's gRPC
#      packages, segmentation-models-pytorch (needed to build the models);
#   2. pytest -m "gpu or trt" over the test files that carry those marks;
#   3. builds (or reuses) a random-weight ResNet-34 U-Net at 256x1600 (frames and U-Net at full
#      resolution, decoder 256..16), one fold: fp32 ONNX, fp16 ONNX, .pt bundle; with TensorRT, an fp16
#      engine for batches 1..64 (timing cache shared with the ensemble's build);
#   4. bench throughput for every GPU backend present (torch fp32, torch fp16 channels_last, ONNX
#      Runtime CUDA, TensorRT fp16) and the naive pipeline on CUDA, batch sizes 1..64;
#   5. bench stream on the fastest backend: 1, 4 and 16 streams at full speed, then 16 cameras at a
#      fixed 25 fps each;
#   6. the same as 3-4 for the 5-fold ensemble.
#
# Results go to $OUT when set (the lent machine's return folder; at most 8 files, so exactly these:
# gpu_suite.md, gpu_suite.log, throughput-single.{json,png}, throughput-ensemble.{json,png},
# stream.json, stream-fps.json), else to benchmarks/results/. Models and engines are cached outside
# $OUT (GPU_SUITE_CACHE, default /tmp/strip-bench-cache with $OUT, else benchmarks/results/models).
#
# Python: $PYTHON, else the repository's .venv, else python3. The repository is used from its
# checkout (PYTHONPATH), not installed. Packages missing on the lent machine travel as wheels in .whl/
# (git-ignored; installed into /tmp/site here). This workplace's GPU image lacks
# segmentation-models-pytorch (needed to build the models) and may lack the server's gRPC packages at the
# versions the committed generated code needs (grpcio >= 1.85.1, protobuf >= 7.35.1). Fetch them
# where pip works, then carry .whl with the run:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl segmentation-models-pytorch==0.6.0 grpcio==1.85.3 grpcio-health-checking==1.85.1 \
#     grpcio-reflection==1.85.1 protobuf==7.36.2
# onnxruntime-gpu and TensorRT wheels are far larger than what travels; without them their rows are
# skipped and the summary says so. Whatever is missing, the checks stage names it.
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $arg (expected --cpu-dry-run)" >&2; exit 2 ;;
    esac
done
[[ "${GPU_SUITE_CPU_DRY_RUN:-0}" == 1 ]] && DRY_RUN=1

START=$(date +%s)
BUDGET=${GPU_SUITE_BUDGET_S:-510}
DEADLINE=$((START + BUDGET))
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

if [[ -n "${OUT:-}" ]]; then
    RESULTS=$OUT
    CACHE=${GPU_SUITE_CACHE:-/tmp/strip-bench-cache}
else
    RESULTS=$REPO/benchmarks/results
    CACHE=${GPU_SUITE_CACHE:-$REPO/benchmarks/results/models}
fi
mkdir -p "$RESULTS" "$CACHE"
SUMMARY=$RESULTS/gpu_suite.md
LOG=$RESULTS/gpu_suite.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    echo "installing the carried wheels: $(cd "$REPO/.whl" && ls ./*.whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$REPO"/.whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
    echo "# GPU suite $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)'), python $("$PY" -V 2>&1)"
    [[ $DRY_RUN == 1 ]] && echo "- CPU DRY RUN: CPU backends and tiny sizes; the figures mean nothing"
    echo
    echo "## Stages"
    echo
} >"$SUMMARY"

# run_stage NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left); records the outcome.
run_stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 20)); then
        echo "- $name: skipped, the suite's ${BUDGET} s budget is spent" >>"$SUMMARY"
        echo "=== $name: skipped (budget spent) ==="
        return 99
    fi
    local limit=$((cap < left ? cap : left))
    echo "=== $name (limit ${limit} s) ==="
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if ((rc == 0)); then
        status="ok"
    elif ((rc == 124 || rc == 137)); then
        status="TIMED OUT after ${limit} s"
    else
        status="FAILED (exit $rc)"
    fi
    echo "- $name: $status in $(($(date +%s) - t0)) s" >>"$SUMMARY"
    return $rc
}

note() { echo "- $*" >>"$SUMMARY"; echo "$*"; }

# ----------------------------------------------------------------------------- 1. what is here
ENV_FILE=$(mktemp)
run_stage "checks" 90 "$PY" - "$DRY_RUN" >"$ENV_FILE" <<'PYCHECK'
import importlib, shlex, sys
dry = sys.argv[1] == "1"
lines, facts = [], []

def have(module):
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"

torch_ok, why = have("torch")
cuda = False
if torch_ok:
    import torch
    cuda = torch.cuda.is_available()
    facts.append(f"torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}")
else:
    facts.append(f"torch missing ({why})")
ort_ok, why = have("onnxruntime")
providers = []
if ort_ok:
    import onnxruntime as ort
    providers = ort.get_available_providers()
    facts.append(f"onnxruntime {ort.__version__}, providers {', '.join(providers)}")
else:
    facts.append(f"onnxruntime missing ({why})")
trt_ok, why = have("tensorrt")
facts.append(f"tensorrt {__import__('tensorrt').__version__}" if trt_ok else f"tensorrt missing ({why})")
smp_ok, why = have("segmentation_models_pytorch")
facts.append("segmentation-models-pytorch present" if smp_ok else f"segmentation-models-pytorch missing ({why})")
server_ok = all(have(m)[0] for m in ("grpc", "grpc_health.v1.health_pb2", "grpc_reflection.v1alpha.reflection",
                                      "prometheus_client", "server.service"))
facts.append("server packages present" if server_ok else
             f"server packages missing ({'; '.join(have(m)[1] for m in ('grpc_health.v1.health_pb2', 'grpc_reflection.v1alpha.reflection', 'server.service') if not have(m)[0])})")

if dry:
    backends = ["onnxruntime", "torch", "naive"] if (torch_ok and ort_ok) else []
else:
    backends = []
    if cuda:
        backends += ["torch-cuda-fp32", "torch-cuda-fp16"]
    if cuda and "CUDAExecutionProvider" in providers:
        backends.append("onnxruntime-cuda")
    if cuda and trt_ok:
        backends.append("tensorrt")
    if backends:
        backends.append("naive-cuda")
print(f"BACKENDS={shlex.quote(','.join(backends))}")
print(f"HAVE_TRT={int(trt_ok and cuda and not dry)}")
print(f"HAVE_SMP={int(smp_ok)}")
print(f"HAVE_SERVER={int(server_ok)}")
print(f"FACTS={shlex.quote(' | '.join(facts))}")
PYCHECK
BACKENDS="" HAVE_TRT=0 HAVE_SMP=0 HAVE_SERVER=0 FACTS="checks did not run"
# shellcheck disable=SC1090
source <(grep -E '^(BACKENDS|HAVE_TRT|HAVE_SMP|HAVE_SERVER|FACTS)=' "$ENV_FILE")
cat "$ENV_FILE"
rm -f "$ENV_FILE"
note "found: $FACTS"
note "backends to measure: ${BACKENDS:-none}"

# ----------------------------------------------------------------------------- 2. GPU/TensorRT tests
if [[ $DRY_RUN == 1 ]]; then
    note "pytest -m 'gpu or trt': not run in a CPU dry run (every such test would skip here)"
else
    mapfile -t MARKED < <(grep -rlE 'mark\.(gpu|trt)|pytestmark.*(gpu|trt)' tests --include='test_*.py' | sort)
    if ((${#MARKED[@]})); then
        run_stage "pytest -m 'gpu or trt' (${#MARKED[@]} files)" 150 \
            "$PY" -m pytest -m "gpu or trt" -q -rs -p no:cacheprovider "${MARKED[@]}"
    else
        note "pytest: no test file carries the gpu/trt marks"
    fi
fi

if [[ -z "$BACKENDS" || $HAVE_SMP != 1 ]]; then
    if [[ "$FACTS" == "checks did not run" ]]; then
        note "no benchmark: the checks did not run"
    elif [[ $HAVE_SMP != 1 ]]; then
        note "no benchmark: segmentation-models-pytorch is missing (carry its wheel, see the header)"
    else
        note "no benchmark: no backend can run here"
    fi
    echo "suite done in $(($(date +%s) - START)) s; summary $SUMMARY"
    exit 1
fi

# ----------------------------------------------------------------------------- sizes
# Random weights (--fit-steps 0): these rows measure GPU speed, and fitting a ResNet-34 U-Net on the
# machine's CPU would take the suite's whole budget.
if [[ $DRY_RUN == 1 ]]; then
    MODEL_ARGS=(--encoder resnet18 --decoder-channels 16,8,4 --height 64 --width 320 --train-height 32
                --train-width 160 --parity-frames 1 --fit-steps 0)
    BATCHES=1,2
    BENCH_ARGS=(--frames 2 --min-repeats 2 --naive-frames 1 --peak-size 256 --peak-seconds 0.05)
    STREAM_ARGS=(--streams 1,2 --frames 4 --raw-repeats 1 --device cpu)
    FPS_ARGS=(--streams 2 --fps 20 --frames 4 --raw-repeats 1 --device cpu)
    ENSEMBLE_FOLDS=2
else
    MODEL_ARGS=(--encoder resnet34 --decoder-channels 256,128,64,32,16 --height 256 --width 1600
                --train-height 256 --train-width 1600 --fp16 --parity-frames 1 --fit-steps 0)
    BATCHES=1,2,4,8,16,32,64
    BENCH_ARGS=(--frames 64 --min-repeats 3 --naive-frames 8 --warmup 2)
    STREAM_ARGS=(--streams 1,4,16 --frames 1024 --max-batch 32 --raw-repeats 5 --device cuda)
    FPS_ARGS=(--streams 16 --fps 25 --frames 800 --max-batch 32 --raw-repeats 5 --device cuda)
    ENSEMBLE_FOLDS=5
fi

# bench_set NAME FOLDS BUILD_CAP ENGINE_CAP BENCH_CAP: model, engine, throughput for one model set.
bench_set() {
    local name=$1 folds=$2
    local files
    files=$(mktemp)
    if ! run_stage "$name model ($folds fold(s)): build or reuse" "$3" \
        "$PY" -m benchmarks.cli model "${MODEL_ARGS[@]}" --folds "$folds" --cache-dir "$CACHE" >"$files"; then
        rm -f "$files"
        return 1
    fi
    cat "$files"
    local onnx pt fp16
    onnx=$(grep -E '/model\.onnx$' "$files")
    pt=$(grep -E '/model\.pt$' "$files")
    fp16=$(grep -E '/model-fp16\.onnx$' "$files" || true)
    rm -f "$files"
    local models=(--model "$pt" --model "$onnx")
    if [[ $HAVE_TRT == 1 && -n "$fp16" ]]; then
        local engine=${fp16%.onnx}.engine
        if [[ -f "$engine" && -f "$engine.json" && "$engine" -nt "$fp16" ]]; then
            note "$name engine: reusing $engine"
        else
            run_stage "$name engine: TensorRT fp16 build, batch 1..64" "$4" \
                "$PY" -m toolchain.cli build --onnx "$fp16" --out "$engine" --precision fp16 --min-batch 1 \
                --opt-batch 16 --max-batch 64 --timing-cache "$CACHE/timing.cache"
        fi
        [[ -f "$engine" ]] && models+=(--model "$engine")
    fi
    run_stage "$name throughput: $BACKENDS at batch $BATCHES" "$5" \
        "$PY" -m benchmarks.cli throughput "${models[@]}" --backends "$BACKENDS" --batch-sizes "$BATCHES" \
        "${BENCH_ARGS[@]}" --json "$RESULTS/throughput-$name.json" --plot "$RESULTS/throughput-$name.png" \
        --markdown "$TABLES"
}

TABLES=$(mktemp)
bench_set single 1 150 200 170

# ----------------------------------------------------------------------------- 5. stream, fastest backend
if [[ $HAVE_SERVER != 1 ]]; then
    note "bench stream: skipped, the server's packages are missing (see the checks above)"
elif [[ ! -f "$RESULTS/throughput-single.json" ]]; then
    note "bench stream: skipped, no single-model throughput to pick the fastest backend from"
else
    FASTEST=$("$PY" - "$RESULTS/throughput-single.json" <<'PYFAST'
import json, sys
report = json.load(open(sys.argv[1]))
rows = [r for r in report["rows"] if not r["backend"].startswith("naive")]
best = max(rows, key=lambda r: r["images_per_s"])
path = next(m["path"] for m in report["models"] if m["file"] == best["model"])
print(best["backend"], path)
PYFAST
    )
    read -r FAST_BACKEND FAST_MODEL <<<"$FASTEST"
    note "fastest single-model backend: $FAST_BACKEND ($FAST_MODEL)"
    run_stage "stream: $FAST_BACKEND, saturation" 100 \
        "$PY" -m benchmarks.cli stream --model "$FAST_MODEL" "${STREAM_ARGS[@]}" --json "$RESULTS/stream.json" \
        --markdown "$TABLES"
    run_stage "stream: $FAST_BACKEND, fixed rate" 60 \
        "$PY" -m benchmarks.cli stream --model "$FAST_MODEL" "${FPS_ARGS[@]}" --json "$RESULTS/stream-fps.json" \
        --markdown "$TABLES"
fi

# ----------------------------------------------------------------------------- 6. the 5-fold ensemble
bench_set ensemble "$ENSEMBLE_FOLDS" 200 200 200

{
    echo
    echo "## Tables"
    echo
    cat "$TABLES"
} >>"$SUMMARY"
rm -f "$TABLES"
echo "suite done in $(($(date +%s) - START)) s; results in $RESULTS"
if grep -qE 'FAILED|TIMED OUT' "$SUMMARY"; then
    exit 1
fi
exit 0
