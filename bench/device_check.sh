#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no internet, PyTorch + onnxruntime preinstalled, no TensorRT):
# the GPU tests and the benches, every result under $OUT. A part whose needs are missing is skipped with a
# line saying why, so a call always brings back whatever could be measured.
#
#   bash bench/device_check.sh [PARTS]     PARTS: comma list of tests,networks,pipeline (default: all three)
#
# tests and networks need only the image's PyTorch. pipeline also needs mediapipe, av, moderngl and glcontext
# (wheels under .whl/, installed into /tmp/site, which lives as long as the machine stays warm) and the GL
# loader libraries (.deb files under .gl/). See engines/README.md, "Measuring on a lent GPU".
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PY:-python3}
PARTS=",${1:-tests,networks,pipeline},"
cd "$(dirname "$0")/.."

step() { echo; echo "=== $* ($(date +%T))"; }

wheels=$(find .whl -name '*.whl' 2>/dev/null)
if [ -n "$wheels" ]; then
    step "installing carried wheels into /tmp/site"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".gl/*.deb" >/dev/null && command -v nvidia-smi >/dev/null; then  # the device only: it writes to /
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    nvidia_egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    [ -f "$nvidia_egl" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$nvidia_egl
fi

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$OUT/device.txt"

if [[ $PARTS == *,tests,* ]]; then
    step "GPU tests"
    "$PY" -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests/test_engines.py tests/test_gpu_runtime.py \
        tests/test_gpu_crop.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi

if [[ $PARTS == *,networks,* ]]; then
    step "networks: every backend x precision x batch, eager fp32 baseline in the same run"
    "$PY" bench/bench_networks.py --device cuda:0 --out "$OUT/networks.json" 2>&1 | grep -v Warning \
        | tee "$OUT/networks.log"
fi

if [[ $PARTS == *,pipeline,* ]]; then
    if "$PY" -c "import mediapipe, av, moderngl" 2>"$OUT/imports.log"; then
        step "pipeline: 480p file throughput and 720p live latency"
        "$PY" bench/bench_all.py --device cuda --skip networks --out "$OUT/all.json" 2>&1 | tee "$OUT/all.log" \
            | tail -40
    else
        step "pipeline skipped: $(tail -1 "$OUT/imports.log") (carry the wheels in .whl/)"
    fi
fi
echo "results in $OUT"
