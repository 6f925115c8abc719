#!/usr/bin/env bash
# GPU validation in one command (issues 7 and 12), on a machine with a CUDA torch,
# Triton, nvcc, ninja and pytest (no internet needed), from a bare checkout:
#
#   bash benchmarks/run_gpu.sh [OUTDIR] [STAGE ...]
#   bash benchmarks/run_gpu.sh --dry-run [STAGE ...]      (CPU: checks the plan)
#   bash benchmarks/run_gpu.sh --plan                     (prints the plan)
#
# The whole run fits a total budget, RUN_GPU_BUDGET seconds (default 480: an H200
# lease gives about 15 minutes with the machine's start, at most 10 a command).
# Stages, in this order (the most valuable first), each step under its own
# `timeout`: min(its cap x budget / 480, what is left of the budget); a step with
# under 10 s left is skipped and recorded so:
#
#   build        pip install -e . with MAX_JOBS = nproc, then lipfast.build_info()
#   tests_first  the CUDA tests of oc_attention and upsample_ce (pytest -m cuda)
#   ceilings     benchmarks/gpu_ceilings.py --quick (copy GB/s, matmul TFLOP/s)
#   bench_quick  every benchmark at its --quick shapes (floors against the ceilings
#                and the H200 data sheet: --datasheet h200)
#   tests_rest   the other CUDA tests
#   bench_full   the full shapes: attn bf16, attn fp32, abn, abn bf16, loss, miou,
#                train_step, train_step --model hrnetv2_w48 (bf16, 473x473, B=8),
#                parse (lipfast.Parser bf16 vs SCHP's extractor), then
#                train_step --max-batch
#   resources    nvcc -Xptxas -v of the CUDA kernels (registers, spills)
#   memcheck     compute-sanitizer memcheck over the CUDA kernels' tests
#   tests_cpu    (on request only) the non-GPU tests as CI runs them
#
# Default: all but tests_cpu. Groups: `tests` = tests_first tests_rest, `bench` =
# ceilings bench_quick bench_full, `all`. Stages named run in the plan's order.
#
# Results are written as they come: OUTDIR/env.json (GPU, driver, CUDA, torch,
# Triton, nvcc, commit, date), per step a log (NAME.log) and, for benchmarks, JSON
# (NAME.json, attn's rewritten after every row), and after every step status.txt,
# summary.json and README.md (a results table generated from what was measured,
# benchmarks/_gpu_report.py), so a run cut off at its limit still returns what it
# measured. RUN_GPU_LOGS=DIR puts the logs and JSON in DIR instead and packs them
# into OUTDIR/results.tar.gz after every step (the device tool brings back at
# most 8 files: use RUN_GPU_LOGS=/tmp/gpu bash benchmarks/run_gpu.sh "$OUT").
#
# Environment: RUN_GPU_BUDGET (s, default 480), RUN_GPU_BENCH_ARGS (appended to
# every benchmark command, e.g. "--max-time 5"), RUN_GPU_PYTEST_ARGS (appended to
# every pytest command), MAX_JOBS (default nproc), TORCH_CUDA_ARCH_LIST (default:
# the visible GPU's).
#
# --dry-run (no GPU needed; CI runs it, tests/test_run_gpu.py): every step of the
# stages asked for resolves: the scripts and test files exist, pytest collects the
# selected tests, `python -c` steps run, and every benchmark command parses with
# its flags (and RUN_GPU_BENCH_ARGS) through the script's own main() in
# parse-only mode (benchmarks/_dryrun.py, LIPFAST_BENCH_PARSE_ONLY=1). Exit 1 when
# anything does not.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STAGES="build tests_first ceilings bench_quick tests_rest bench_full resources memcheck tests_cpu"
DEFAULT_STAGES="build tests_first ceilings bench_quick tests_rest bench_full resources memcheck"
MODE=run
pos=()
for a in "$@"; do
  case $a in
    --dry-run) MODE=dry ;;
    --plan) MODE=plan ;;
    -h|--help) sed -n '2,/^set -uo pipefail/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pos+=("$a") ;;
  esac
done
is_stage() { case " $ALL_STAGES tests bench all " in *" $1 "*) return 0 ;; esac; return 1; }
OUT=
if (( ${#pos[@]} )) && ! is_stage "${pos[0]}"; then OUT=${pos[0]}; pos=("${pos[@]:1}"); fi
req=${pos[*]+"${pos[*]}"}
req=${req:-$DEFAULT_STAGES}
STAGES=
for s in $req; do
  case $s in
    all) STAGES+=" $DEFAULT_STAGES" ;;
    tests) STAGES+=" tests_first tests_rest" ;;
    bench) STAGES+=" ceilings bench_quick bench_full" ;;
    *) if is_stage "$s"; then STAGES+=" $s"; else
         echo "run_gpu.sh: unknown stage '$s'; stages: $ALL_STAGES (groups: tests bench all)" >&2
         exit 2; fi ;;
  esac
done
want() { [[ " $STAGES " == *" $1 "* ]]; }

# The interpreter: $PYTHON, else python3 (the device image's torch), else python.
PY=${PYTHON:-$(command -v python3 > /dev/null && echo python3 || echo python)}
BUDGET=${RUN_GPU_BUDGET:-480}
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || (( BUDGET < 30 )); then
  echo "run_gpu.sh: RUN_GPU_BUDGET=$BUDGET: a whole number of seconds >= 30" >&2; exit 2
fi
read -r -a BENCH_ARGS <<< "${RUN_GPU_BENCH_ARGS:-}"
read -r -a PYTEST_ARGS <<< "${RUN_GPU_PYTEST_ARGS:-}"
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
DEADLINE=$(( T0 + BUDGET ))
MIN_STEP=10

if [[ $MODE == run ]]; then
  gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
  OUT=${OUT:-benchmarks/results/${gpu}-$(date +%Y-%m-%d)}
  LOGS=${RUN_GPU_LOGS:-$OUT}
elif [[ $MODE == plan ]]; then
  OUT=${OUT:-OUT}
  LOGS=${RUN_GPU_LOGS:-$OUT}
else
  TMP_OUT=
  [[ -z $OUT ]] && { OUT=$(mktemp -d); TMP_OUT=$OUT; }
  LOGS=$OUT
  mkdir -p "$OUT"
  DRY_BENCH="$OUT/dry-bench.txt"
  : > "$DRY_BENCH"
fi
if [[ $MODE == run ]]; then
  mkdir -p "$OUT" "$LOGS"
  STEPS="$LOGS/steps.tsv"
  : > "$STEPS"
fi
FAILS=0
NSTEPS=0

report() {  # status.txt, summary.json, README.md (and the bundle) after every step
  "$PY" benchmarks/_gpu_report.py "$OUT" "$LOGS" "$BUDGET" > /dev/null 2>> "$LOGS/report.err"
  if [[ $LOGS != "$OUT" ]]; then
    tar czf "$OUT/results.tar.gz.tmp" -C "$LOGS" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
  fi
}

# step NAME STAGE CAP KIND CMD...: KIND bench (a benchmark script: RUN_GPU_BENCH_ARGS
# appended), pytest (RUN_GPU_PYTEST_ARGS appended) or sh. CAP: seconds at budget 480.
step() {
  local name=$1 stage=$2 cap=$3 kind=$4; shift 4
  local cmd=("$@")
  [[ $kind == bench ]] && cmd+=(${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"})
  [[ $kind == pytest ]] && cmd+=(${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"})
  local t=$(( cap * BUDGET / 480 ))
  NSTEPS=$(( NSTEPS + 1 ))
  case $MODE in
    plan) printf '%-12s %-20s cap %4ss  %s\n' "$stage" "$name" "$t" "${cmd[*]}"; return ;;
    dry) dry_step "$name" "$stage" "$t" "$kind" "${cmd[@]}"; return ;;
  esac
  if ! command -v "${cmd[0]}" > /dev/null; then
    echo "== $name: SKIPPED (${cmd[0]} is not installed)" | tee -a "$OUT/status.txt"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$stage" "-" 0 0 "skipped: no ${cmd[0]}" >> "$STEPS"
    report; return
  fi
  local left=$(( DEADLINE - $(date +%s) ))
  (( t > left - 2 )) && t=$(( left - 2 ))
  if (( t < MIN_STEP )); then
    echo "== $name: SKIPPED (budget: ${left}s left of ${BUDGET}s)" | tee -a "$OUT/status.txt"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$stage" "-" 0 "$t" skipped >> "$STEPS"
    report; return
  fi
  echo "== $name [$stage, timeout ${t}s, $(( left ))s left]: ${cmd[*]}"
  local t1; t1=$(date +%s)
  timeout -k 10 "$t" "${cmd[@]}" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t1 )) state=ok
  (( rc == 124 || rc == 137 )) && state=timeout
  (( rc != 0 )) && [[ $state == ok ]] && state=failed
  [[ $state != ok ]] && FAILS=$(( FAILS + 1 ))
  echo "$name rc=$rc ${dt}s (timeout ${t}s) $state" | tee -a "$OUT/status.txt"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$stage" "$rc" "$dt" "$t" "$state" >> "$STEPS"
  tail -n 4 "$LOGS/$name.log"
  report
}

DRY_FAIL=0
dry_fail() { echo "DRY-RUN FAIL $*"; DRY_FAIL=$(( DRY_FAIL + 1 )); }
dry_step() {
  local name=$1 stage=$2 t=$3 kind=$4; shift 4
  local cmd=("$@") a
  case $kind in
    bench)
      [[ -f ${cmd[1]} ]] || { dry_fail "$stage/$name: ${cmd[1]} not found"; return; }
      printf '%s %s ' "$stage/$name" >> "$DRY_BENCH"
      printf '%q ' "${cmd[@]}" >> "$DRY_BENCH"; echo >> "$DRY_BENCH"
      echo "DRY-RUN $stage/$name (cap ${t}s): ${cmd[*]}  [flags parsed below]" ;;
    pytest)
      local i=0 sel=() skip=0 n
      while (( i < ${#cmd[@]} )) && [[ ${cmd[i]} != pytest ]]; do i=$(( i + 1 )); done
      (( i < ${#cmd[@]} )) || { dry_fail "$stage/$name: no pytest in: ${cmd[*]}"; return; }
      for a in "${cmd[@]:i+1}"; do
        if (( skip )); then skip=0; continue; fi
        case $a in
          tests/*) [[ -e $a ]] || { dry_fail "$stage/$name: $a not found"; return; } ;;
          --ignore=*) [[ -e ${a#--ignore=} ]] || { dry_fail "$stage/$name: ${a#--ignore=} not found"; return; } ;;
        esac
        # What the step selects (files, -m, -k, --ignore), without its reports.
        case $a in --junitxml) skip=1; continue ;; --junitxml=*|-v|-q|-rs|-rfEs|-x) continue ;; esac
        sel+=("$a")
      done
      n=$("$PY" -m pytest --collect-only -q "${sel[@]}" 2>&1 | tee "$OUT/$name.collect" \
          | grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' | tail -n 1)
      if [[ -z $n || $n == 0* ]]; then
        dry_fail "$stage/$name: pytest selected no test: ${sel[*]} (see $OUT/$name.collect)"; return
      fi
      echo "DRY-RUN ok $stage/$name (cap ${t}s): ${cmd[*]}  [$n]" ;;
    sh)
      local i=0
      [[ ${cmd[0]} == env ]] && i=1
      while (( i < ${#cmd[@]} )) && [[ ${cmd[i]} == *=* ]]; do i=$(( i + 1 )); done
      local sub=("${cmd[@]:i}")
      if [[ ${sub[0]} == "$PY" && ${sub[1]} == -c ]]; then
        "$PY" -c "${sub[2]}" > /dev/null 2>&1 || { dry_fail "$stage/$name: python -c failed: ${sub[2]}"; return; }
      elif [[ ${sub[0]} == "$PY" && ${sub[1]} == -m ]]; then
        "$PY" -c "import ${sub[2]}" 2>/dev/null || { dry_fail "$stage/$name: no module ${sub[2]}"; return; }
      elif [[ ${sub[0]} == bash && ${sub[1]} == -c ]]; then
        bash -n -c "${sub[2]}" || { dry_fail "$stage/$name: bash syntax"; return; }
        if [[ ${sub[2]} == *csrc/ops/cuda/*.cu* ]] && ! compgen -G 'csrc/ops/cuda/*.cu' > /dev/null; then
          dry_fail "$stage/$name: no csrc/ops/cuda/*.cu"; return
        fi
        command -v nvcc > /dev/null || echo "DRY-RUN note $stage/$name: nvcc is not on PATH here (needed on the GPU machine)"
      elif ! command -v "${sub[0]}" > /dev/null; then
        echo "DRY-RUN note $stage/$name: ${sub[0]} is not on PATH here (needed on the GPU machine)"
      fi
      echo "DRY-RUN ok $stage/$name (cap ${t}s): ${cmd[*]}" ;;
  esac
}

# --------------------------------------------------------------------------- env
if [[ $MODE == run ]]; then
  arch=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
  export MAX_JOBS=$JOBS
  BUDGET=$BUDGET JOBS=$JOBS STAGES="$STAGES" "$PY" - > "$OUT/env.json" <<'PY'
import datetime, json, os, subprocess
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None
env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "commit": sh("git rev-parse HEAD"), "dirty": bool(sh("git status --porcelain")),
       "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
       "nvcc": sh("nvcc --version | tail -n 2 | head -n 1"), "nproc": os.cpu_count(),
       "max_jobs": os.environ.get("JOBS"), "budget_s": int(os.environ["BUDGET"]),
       "stages": os.environ["STAGES"].split(), "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda)
    env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
               gpu_memory_GiB=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as err:
    env["torch_error"] = repr(err)
try:
    import triton
    env["triton"] = triton.__version__
except Exception:
    env["triton"] = None
print(json.dumps(env, indent=2))
PY
  cat "$OUT/env.json"
  : > "$OUT/status.txt"
  echo "== budget ${BUDGET}s, MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, stages:$STAGES"
  report
  sm=${arch/./}
else
  sm=90
  [[ $MODE == dry ]] && echo "DRY-RUN budget ${BUDGET}s, stages:$STAGES"
fi

# --------------------------------------------------------------------------- plan
L=$LOGS
CEIL=(--ceilings "$L/ceilings.json" --datasheet h200)
if want build; then
  step build build 200 sh env MAX_JOBS="$JOBS" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
  step build_info build 30 sh "$PY" -c "import lipfast, json; print(json.dumps(lipfast.build_info()))"
fi
if want tests_first; then  # the kernels that matter most: OC attention, upsample + CE
  step tests_first tests_first 100 pytest "$PY" -m pytest -v -rfEs -p no:cacheprovider -m cuda \
    tests/test_oc_attention.py tests/test_upsample_ce.py --junitxml "$L/tests_first.xml"
fi
if want ceilings; then
  step ceilings ceilings 40 bench "$PY" benchmarks/gpu_ceilings.py --quick --json "$L/ceilings.json"
fi
if want bench_quick; then
  step attn_quick bench_quick 60 bench "$PY" benchmarks/attn.py --quick "${CEIL[@]}" --json "$L/attn_quick.json"
  step abn_quick bench_quick 30 bench "$PY" benchmarks/abn.py --quick "${CEIL[@]}" --json "$L/abn_quick.json"
  step loss_quick bench_quick 40 bench "$PY" benchmarks/loss.py --quick --no-rss "${CEIL[@]}" --json "$L/loss_quick.json"
  step miou_quick bench_quick 30 bench "$PY" benchmarks/miou.py --quick "${CEIL[@]}" --json "$L/miou_quick.json"
  step train_step_quick bench_quick 60 bench "$PY" benchmarks/train_step.py --quick "${CEIL[@]}" --json "$L/train_step_quick.json"
  step parse_quick bench_quick 30 bench "$PY" benchmarks/parse.py --quick --json "$L/parse_quick.json"
  step pose_quick bench_quick 40 bench "$PY" benchmarks/pose.py --quick "${CEIL[@]}" --json "$L/pose_quick.json"
fi
if want tests_rest; then  # every other CUDA test
  step tests_rest tests_rest 150 pytest "$PY" -m pytest -v -rfEs -p no:cacheprovider -m cuda tests \
    --ignore=tests/test_oc_attention.py --ignore=tests/test_upsample_ce.py --junitxml "$L/tests_rest.xml"
fi
if want bench_full; then
  step attn_bf16 bench_full 150 bench "$PY" benchmarks/attn.py --full --dtype bf16 "${CEIL[@]}" --json "$L/attn_bf16.json"
  step attn_fp32 bench_full 150 bench "$PY" benchmarks/attn.py --full --dtype fp32 "${CEIL[@]}" --json "$L/attn_fp32.json"
  step abn bench_full 60 bench "$PY" benchmarks/abn.py --full "${CEIL[@]}" --json "$L/abn.json"
  step abn_bf16 bench_full 60 bench "$PY" benchmarks/abn.py --full --dtype bf16 "${CEIL[@]}" --json "$L/abn_bf16.json"
  step loss bench_full 90 bench "$PY" benchmarks/loss.py --full --no-rss "${CEIL[@]}" --json "$L/loss.json"
  step miou bench_full 60 bench "$PY" benchmarks/miou.py "${CEIL[@]}" --json "$L/miou.json"
  step train_step bench_full 120 bench "$PY" benchmarks/train_step.py "${CEIL[@]}" --json "$L/train_step.json"
  # issue 14: HRNetV2-W48 (seg head) bf16 473x473 B=8, timed rounds capped at 20 s
  step train_step_hrnet bench_full 90 bench "$PY" benchmarks/train_step.py --model hrnetv2_w48 --max-time 20 "${CEIL[@]}" --json "$L/train_step_hrnet.json"
  step parse bench_full 90 bench "$PY" benchmarks/parse.py --dtype bf16 --images 8 --json "$L/parse.json"
  step train_step_max_batch bench_full 240 bench "$PY" benchmarks/train_step.py --max-batch --no-floor --json "$L/train_step_max_batch.json"
fi
if want resources; then
  step resources resources 60 sh bash -c "for f in csrc/ops/cuda/*.cu; do echo \$f; nvcc -std=c++20 -O3 -Xptxas -v -gencode=arch=compute_${sm},code=sm_${sm} -c \$f -o /dev/null 2>&1 | grep -E 'Function properties|registers|spill'; done"
fi
if want memcheck; then
  step memcheck memcheck 240 pytest compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_abn.py tests/test_upsample_ce.py tests/test_edge.py tests/test_metrics.py \
    -k "not compile and not opcheck and not subprocess"
fi
if want tests_cpu; then  # the rest, as CI runs it (Triton kernels on CPU tensors: interpreter)
  step tests_cpu tests_cpu 600 pytest env TRITON_INTERPRET=1 "$PY" -m pytest tests -q -rs -p no:cacheprovider -m "not cuda" \
    --junitxml "$L/tests_cpu.xml"
fi

# --------------------------------------------------------------------------- end
case $MODE in
  plan) echo "$NSTEPS steps, budget ${BUDGET}s (caps scale with RUN_GPU_BUDGET / 480)"; exit 0 ;;
  dry)
    if [[ -s $DRY_BENCH ]]; then
      "$PY" benchmarks/_dryrun.py "$DRY_BENCH" || DRY_FAIL=$(( DRY_FAIL + 1 ))
    fi
    if (( DRY_FAIL )); then echo "dry run: FAILED ($DRY_FAIL problem(s)) in $NSTEPS steps, stages:$STAGES"; exit 1; fi
    [[ -n $TMP_OUT ]] && rm -rf "$TMP_OUT"
    echo "dry run: ok, $NSTEPS steps resolve, stages:$STAGES"; exit 0 ;;
esac
report
echo "== done in $(( $(date +%s) - T0 ))s of ${BUDGET}s: $OUT ($FAILS step(s) failed or timed out)"
cat "$OUT/status.txt"
(( FAILS == 0 ))
