#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no internet, PyTorch + onnxruntime preinstalled, no TensorRT):
# the GPU tests, then the benches, every result under $OUT. Each step is skipped, with a line saying why, when
# what it needs is missing, so one call always brings back whatever could be measured.
#
#   bash bench/device_check.sh            # on the device: tests + bench_networks (no extra wheels needed)
#
# The whole-pipeline benches also need mediapipe, av, moderngl and glcontext. Carry them as wheels in .whl/
# (see engines/README.md, "Measuring on a lent GPU"); this script installs whatever is in .whl/ first.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
cd "$(dirname "$0")/.."

step() { echo; echo "=== $* ($(date +%T))"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    step "installing carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$OUT/device.txt"

step "GPU tests"
"$PY" -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests/test_engines.py tests/test_gpu_runtime.py \
    tests/test_gpu_crop.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

step "networks: every backend x precision x batch, eager fp32 baseline in the same run"
"$PY" bench/bench_networks.py --device cuda:0 --out "$OUT/networks.json" 2>&1 | grep -v Warning | tee "$OUT/networks.log"

if "$PY" -c "import mediapipe, av, moderngl" 2>/dev/null; then
    step "pipeline: 480p file throughput and 720p live latency"
    "$PY" bench/bench_all.py --device cuda --skip networks --out "$OUT/all.json" 2>&1 | tee "$OUT/all.log" | tail -40
else
    step "pipeline benches skipped: mediapipe, av or moderngl is not importable (carry them in .whl/)"
fi
echo "results in $OUT"
