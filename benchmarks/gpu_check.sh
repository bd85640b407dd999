#!/usr/bin/env bash
# The GPU checks of the SAE step, prepared to run once on a lent GPU machine (one H200,
# under 8 minutes) through the device tool, from the repository root:
#
#   (a) the TopK step benchmark on CUDA at d = 768, n = 131,072, k = 32, B = 4096 beside
#       eai-sparsify and SAELens where they import: tokens/s and the floor fraction against
#       the bf16 encoder product (benchmarks/bench_step.py --device cuda), with GPU memory;
#   (b) the device tests with a real "cuda" device besides the fake one
#       (tests/test_devices.py, which parametrises over "cuda" when torch sees a GPU);
#   (c) the tiny workflow's train and evaluate stages with train.device cuda, for every
#       architecture (tests/test_devices.py::test_a_tiny_cell_trains_on_a_gpu_and_evaluates,
#       on the tiny LM and corpus the tests build; no Snakemake, which the machine lacks).
#
# Everything it prints goes to $OUT (gpu_check.log, one file per part), which the device
# tool brings back; without $OUT, to ./gpu-check-out.
#
# The machine has no internet and its python3 has torch (CUDA), transformers, pandas,
# pyarrow, h5py, safetensors, pytest, tokenizers, but not jsonschema (the config schema,
# needed by the tests) nor the peers. Carry them as wheels in an ignored folder .whl:
#
#   echo /.whl/ >> .git/info/exclude
#   P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
#      --platform manylinux2014_x86_64 -d .whl"
#   python3 -m pip download $P jsonschema==4.26.0 jsonschema-specifications referencing rpds-py
#   python3 -m pip download $P eai-sparsify==1.3.3 natsort schedulefree simple-parsing \
#       docstring-parser datasets dill multiprocess            # optional: the sparsify row
#   # optional, large: sae-lens==6.54.12 and its tree (transformer-lens, ...); a row whose
#   # library does not import is printed as "not installed"
#
# (keep the folder under the tool's 64 MiB), then, with the device tool:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# This script installs .whl/*.whl (if any) into /tmp/site. Dry check on a CPU machine, small
# shapes: DEVICE=cpu N=1024 D=64 BATCH=256 bash benchmarks/gpu_check.sh
set -uo pipefail

OUT=${OUT:-$PWD/gpu-check-out}
DEVICE=${DEVICE:-cuda}
N=${N:-131072}
D=${D:-768}
K=${K:-32}
BATCH=${BATCH:-4096}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "installing the carried wheels failed"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

echo "== machine ($(date -u))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
for name in ("saesweep", "jsonschema", "sparsify", "sae_lens", "triton"):
    try:
        importlib.import_module(name)
        print(f"import {name}: ok")
    except Exception as error:
        print(f"import {name}: {type(error).__name__}: {error}")
EOF

echo "== (a) the TopK step at d=$D n=$N k=$K B=$BATCH on $DEVICE"
timeout 270 "$PYTHON" benchmarks/bench_step.py --device "$DEVICE" --d "$D" --n "$N" --k "$K" \
    --batch "$BATCH" --repeats 5 2>&1 | tee "$OUT/bench_step.txt" || { echo "(a) failed or timed out"; status=1; }

echo "== (b) device tests (fake CUDA, and real CUDA when visible)"
timeout 75 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_devices.py -k "not tiny_cell" \
    2>&1 | tee "$OUT/test_devices.txt" || { echo "(b) failed"; status=1; }

echo "== (c) the tiny workflow's cells with train.device cuda"
timeout 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_devices.py -k "tiny_cell" \
    2>&1 | tee "$OUT/tiny_workflow.txt" || { echo "(c) failed"; status=1; }

echo "== done ($(date -u)), status $status"
exit $status
