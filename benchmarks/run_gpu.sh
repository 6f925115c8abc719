#!/usr/bin/env bash
# GPU validation (issue 7): on a machine with a CUDA torch, Triton, nvcc and
# ninja (no internet needed):
#   bash benchmarks/run_gpu.sh [OUTDIR] [STAGE ...]
# STAGEs (default: build tests bench memcheck, in this order; tests_cpu on request:
# the non-GPU tests as CI runs them, Triton under the interpreter). The device
# tool allows 10 minutes a command, so a session runs e.g. `... OUT build tests`,
# then `... OUT bench`, then `... OUT memcheck` (the build stays between calls).
# 1. builds lipfast._C with CUDA for the visible GPU's architecture,
# 2. prints the CUDA kernels' resource report (registers, spills),
# 3. runs the GPU tests (pytest -m cuda; the rest run in CI and with tests_cpu),
# 4. measures the device's ceilings (copy bandwidth, bf16 matmul),
# 5. runs every benchmark at full size with --json,
# 6. runs compute-sanitizer memcheck over the CUDA kernels' tests when available.
# Every step logs to OUTDIR; a failing step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
OUT=${1:-benchmarks/results/${gpu}-$(date +%Y-%m-%d)}
shift || true
STAGES=${*:-build tests bench memcheck}
want() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
status="$OUT/status.txt"
touch "$status"
step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, record the exit code
  local name=$1; shift
  echo "== $name: $*"
  local t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$status"
  tail -n 5 "$OUT/$name.log"
}

arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
sm=${arch/./}
python - > "$OUT/env.json" <<'PY'
import json, subprocess, datetime, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return None
print(json.dumps({"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                  "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
                  "cuda": torch.version.cuda, "torch": torch.__version__, "triton": tv,
                  "nvcc": sh("nvcc --version | tail -n 2"), "commit": sh("git rev-parse HEAD"),
                  "date": datetime.date.today().isoformat()}, indent=2))
PY
cat "$OUT/env.json"

if want build; then
  step build pip install --no-build-isolation --no-deps -e .
  step build_info python -c "import lipfast, json; print(json.dumps(lipfast.build_info()))"
  step resources bash -c "for f in csrc/ops/cuda/*.cu; do echo \$f; nvcc -std=c++20 -O3 -Xptxas -v -gencode=arch=compute_${sm},code=sm_${sm} -c \$f -o /dev/null 2>&1 | grep -E 'Function properties|registers|spill'; done"
fi
if want tests; then  # the GPU tests (Triton compiled for the device, CUDA kernels)
  step tests_cuda python -m pytest tests -q -rs -m cuda --junitxml "$OUT/tests_cuda.xml"
fi
if want tests_cpu; then  # the rest, as CI runs it (Triton kernels on CPU tensors: interpreter)
  step tests_cpu env TRITON_INTERPRET=1 python -m pytest tests -q -rs -m "not cuda" \
    --junitxml "$OUT/tests_cpu.xml"
fi
if want bench; then
  step ceilings python benchmarks/gpu_ceilings.py --json "$OUT/ceilings.json"
  step bench_attn python benchmarks/attn.py --full --dtype both --json "$OUT/attn.json"
  step bench_abn python benchmarks/abn.py --full --json "$OUT/abn.json"
  step bench_abn_bf16 python benchmarks/abn.py --full --dtype bf16 --json "$OUT/abn-bf16.json"
  step bench_loss python benchmarks/loss.py --full --json "$OUT/loss.json"
  step bench_miou python benchmarks/miou.py --json "$OUT/miou.json"
  step bench_train_step python benchmarks/train_step.py --max-batch --json "$OUT/train_step.json"
fi
if want memcheck && command -v compute-sanitizer > /dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -m cuda \
    tests/test_abn.py tests/test_upsample_ce.py tests/test_edge.py tests/test_metrics.py \
    -k "not compile and not opcheck and not subprocess"
fi
echo "== done: $OUT"; cat "$status"
