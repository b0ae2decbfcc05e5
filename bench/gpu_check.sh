#!/usr/bin/env bash
# The one-shot GPU check: everything a scarce GPU session should run, in one command, from the source tree.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root or anywhere
#
# Uses the machine's own python3/torch/triton/transformers (nothing is installed; PYTHONPATH=.). Parts, each
# under its own `timeout` so that one hang cannot eat the session, and each run even when an earlier one fails:
#   env        GPU, driver, clocks, versions
#   cuda_jit   JIT-build the CUDA C++ backend (trinfer.cuda_kernels.load_jit) when that module exists
#   tests      the whole test suite natively (python -m pytest tests), @pytest.mark.cuda tests included
#   kernels    every kernel benchmark in --quick mode (python -m bench.run_all --quick)
#   e2e        the end-to-end decode benchmark at both shapes (python -m bench.bench_e2e --quick)
# Output: $OUT when set, else bench/results/<UTC date>/ : gpu_check.log (every part's output), kernels.json,
# kernels.md, kernels.png, e2e.json, e2e.md, summary.txt (at most 8 files: what the device tool brings back).
# The summary is printed LAST. Budget: 6.3 minutes if every part runs to its limit; override a part's limit
# with T_JIT, T_TESTS, T_KERNELS, T_E2E (seconds), the interpreter with PYTHON, the pytest-xdist workers with
# TEST_WORKERS (0: none).
set -u -o pipefail
if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT="$PWD/$OUT"; fi  # a relative $OUT, before the cd
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T_JIT=${T_JIT:-60}
T_TESTS=${T_TESTS:-90}
T_KERNELS=${T_KERNELS:-80}
T_E2E=${T_E2E:-130}
OUTDIR=${OUT:-bench/results/$(date -u +%F)}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/summary.txt"
: > "$LOG"
PARTS=()
T0=$SECONDS

# run_part NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, its output appended to the log;
# record status and seconds; on failure print the tail of its output.
run_part() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS part_log rc status
  part_log=$(mktemp)
  echo "[gpu_check] $(date -u +%T) $name: start (limit ${limit}s)"
  { echo; echo "===== $name: $* (limit ${limit}s)"; } >> "$LOG"
  timeout -k 10 "$limit" "$@" > "$part_log" 2>&1
  rc=$?
  cat "$part_log" >> "$LOG"
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL($rc)" ;;
  esac
  local secs=$((SECONDS - start))
  echo "===== $name: $status in ${secs}s" >> "$LOG"
  echo "[gpu_check] $(date -u +%T) $name: $status in ${secs}s"
  if [ "$status" != ok ]; then
    echo "----- last lines of $name:"; tail -n 15 "$part_log" | cut -c1-300; echo "-----"
  fi
  PARTS+=("$name|$status|$secs|$(part_detail "$name" "$part_log")")
  rm -f "$part_log"
}

part_detail() {  # one line of what a part produced
  case $1 in
    env) grep -m1 '^gpu:' "$2" | cut -c1-110 ;;
    cuda_jit) tail -n 1 "$2" | cut -c1-110 ;;
    tests)
      local last
      last=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$2" | tail -n 1 | tr -d '=' | sed 's/^ *//')
      if [ -n "$last" ]; then echo "$last" | cut -c1-110
      else echo "no final line; so far: $(grep -c ' PASSED' "$2") passed, $(grep -c ' FAILED' "$2") failed, $(grep -c ' ERROR' "$2") errors, $(grep -c ' SKIPPED' "$2") skipped"
      fi ;;
    kernels) grep -m1 '^\[bench\] wrote' "$2" | sed 's/^\[bench\] //' | cut -c1-110 ;;
    e2e) grep -m1 '^\[e2e\] wrote' "$2" | sed 's/^\[e2e\] //' | cut -c1-110 ;;
  esac
}

skip_part() {  # skip_part NAME REASON
  echo "[gpu_check] $1: skipped ($2)"
  { echo; echo "===== $1: skipped ($2)"; } >> "$LOG"
  PARTS+=("$1|skipped|0|$2")
}

# ---- env ------------------------------------------------------------------------------------------------
run_part env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
$PY - <<'EOF'
import platform, torch, triton
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print('gpu:', p.name if p else 'NO CUDA GPU', '| cc', f'{p.major}.{p.minor}' if p else '-', '| torch', torch.__version__,
      '| CUDA', torch.version.cuda, '| triton', triton.__version__, '| python', platform.python_version())
try:
    import transformers; print('transformers', transformers.__version__)
except Exception as e: print('transformers: not importable:', e)
for m in ('pytest_timeout', 'gguf'):
    try: __import__(m); print(m, 'present')
    except ImportError: print(m, 'absent')
raise SystemExit(0 if p else 3)
EOF"

# ---- cuda_jit -------------------------------------------------------------------------------------------
if $PY -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('trinfer.cuda_kernels') else 1)" 2>/dev/null; then
  run_part cuda_jit "$T_JIT" $PY -c "
import time, trinfer.cuda_kernels as ck
t = time.time()
if not hasattr(ck, 'load_jit'): raise SystemExit('trinfer.cuda_kernels has no load_jit()')
ck.load_jit()
ok = ck.is_available() if hasattr(ck, 'is_available') else True
print(f'cuda_kernels built in {time.time() - t:.0f}s, is_available()={ok}')
raise SystemExit(0 if ok else 4)"
  case ${PARTS[-1]} in cuda_jit\|ok\|*) export TRINFER_BENCH_JIT=1 ;; esac
else
  skip_part cuda_jit "no trinfer.cuda_kernels module"
fi

# ---- tests ----------------------------------------------------------------------------------------------
# pytest-xdist (on the GPU image) spreads the suite over workers: most of its time is Triton JIT compiles.
TEST_ARGS=(-m pytest tests -v -rfE --durations=15 -p no:cacheprovider)
if $PY -c "import pytest_timeout" 2>/dev/null; then TEST_ARGS+=(--timeout=90); fi
if $PY -c "import xdist" 2>/dev/null && [ "${TEST_WORKERS:-6}" != 0 ]; then TEST_ARGS+=(-n "${TEST_WORKERS:-6}"); fi
run_part tests "$T_TESTS" $PY "${TEST_ARGS[@]}"

# ---- kernels --------------------------------------------------------------------------------------------
# The in-run budget stops starting rows 25 s before the hard limit (imports, the last row and the plot fit in
# that), so the files are always written.
run_part kernels "$T_KERNELS" $PY -m bench.run_all --quick --out "$OUTDIR" --budget-s $((T_KERNELS - 25))

# ---- e2e ------------------------------------------------------------------------------------------------
# Both shapes (Llama-3.2-1B, Llama-3-8B), batch 1, prompt 512, 32 new tokens: trinfer and transformers eager
# first, then transformers static cache + torch.compile where the remaining budget fits its compile.
if [ -f bench/bench_e2e.py ]; then
  run_part e2e "$T_E2E" $PY -m bench.bench_e2e --quick --out "$OUTDIR" --budget-s $((T_E2E - 15)) --no-plot
else
  skip_part e2e "bench/bench_e2e.py not found"
fi

# ---- summary (printed last) -----------------------------------------------------------------------------
{
  echo
  KJSON=$(ls "$OUTDIR"/kernels*.json 2>/dev/null | head -n 1)
  if [ -n "$KJSON" ]; then
    $PY -m bench.summarize "$KJSON" 2>&1 || echo "(summarize failed)"
  else
    echo "(no kernels*.json written)"
  fi
  EJSON=$(ls "$OUTDIR"/e2e*.json 2>/dev/null | head -n 1)
  if [ -n "$EJSON" ]; then
    $PY -m bench.summarize "$EJSON" 2>&1 || echo "(summarize e2e failed)"
  fi
  echo
  echo "== trinfer GPU check: $((SECONDS - T0))s total; results in $OUTDIR"
  printf '%-9s %-10s %5s  %s\n' part status secs detail
  for p in "${PARTS[@]}"; do
    IFS='|' read -r n s t d <<< "$p"
    printf '%-9s %-10s %5s  %s\n' "$n" "$s" "$t" "$d"
  done
} > "$SUMMARY"
cat "$SUMMARY" >> "$LOG"
cat "$SUMMARY"
for p in "${PARTS[@]}"; do
  case $p in *\|ok\|*|*\|skipped\|*) ;; *) exit 1 ;; esac
done
exit 0
