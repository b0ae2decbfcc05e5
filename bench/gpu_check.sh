#!/usr/bin/env bash
# The GPU check: one command for a short GPU session, staged so that a run cut at any point still leaves a verdict.
#
#   bash bench/gpu_check.sh                          # on the GPU machine (from the repository root or anywhere)
#   bash bench/gpu_check.sh --cache PATH.tar.gz      # reuse a previous run's compile caches (also: $GPU_CHECK_CACHE)
#   bash bench/gpu_check.sh --budget 240             # every stage limit scaled to fit 240 s (a second run)
#   bash bench/gpu_check.sh --dry-run                # on any machine: selections exist, limits fit, <= 8 files
#   bash bench/gpu_check.sh --limits [--budget 240]  # only the stage limits and their worst case
#
# Uses the machine's own python3/torch/triton/transformers, nothing installed (PYTHONPATH=.). Stages, in order of
# value, each under its own limit (seconds; env var to override; --budget scales them all):
#   env        15 T_ENV        restore the cache archive; GPU, driver, versions, tools present
#   build     100 T_BUILD      the CUDA C++ JIT build (load_jit, MAX_JOBS=8), then its kernels' smoke cases, in the
#                              background beside the smoke stage
#   smoke      85 T_SMOKE      every kernel once natively against its reference (bench/gpu_cases.py, 4 processes),
#                              and one staggered generate against transformers with CUDA graphs and the async loop
#   sanitize   40 T_SANITIZE   compute-sanitizer: memcheck over every kernel case, racecheck + synccheck over csrc/
#                              (bench/gpu_sanitize.sh; "unavailable", not a failure, where the tool does not work)
#   tests_fast 40 T_TESTS_FAST the kernel and CUDA C++ test files in one process with CUDA_LAUNCH_BLOCKING=1,
#                              stopping at the first failure (an illegal access is reported where it happens)
#   tests      60 T_TESTS      the rest, GPU-relevant files first (CUDA C++ backend, graphs, engine), pytest-xdist
#                              workers, per-test timeout; CPU-only compile checks deselected
#   pack       10 T_PACK       the cache archive (Triton cache + CUDA C++ build + Inductor cache, <= 15 MiB)
#   kernels    35 T_KERNELS    kernel benchmarks (python -m bench.run_all --quick)
#   e2e        35 T_E2E        end-to-end benchmarks: both shapes, trinfer vs transformers eager (and compiled
#                              with a static cache where the budget fits)
#   pack       10              the archive again, with what the benchmarks compiled
# pytest and Python stages are stopped with SIGINT at their limit (pytest then prints its summary and tracebacks),
# killed 5 s later if still running; PYTHONFAULTHANDLER=1 prints the stacks of a crash. Worst case, every stage at
# its limit plus that grace: 390 s (checked by --dry-run). The summary is rewritten after every stage and printed
# last; exit status 1 when a stage failed or timed out.
#
# Output (at most 8 files): $OUT when set, else --out DIR, else bench/results/<UTC date>/: summary.txt,
# gpu_check.log (every stage's full output), kernels.json, kernels.md, kernels.png, e2e.json, e2e.md,
# gpu_cache.tar.gz. A second run finds the archive given by --cache or $GPU_CHECK_CACHE, else
# bench/results/tmp/gpu_cache.tar.gz (git-ignored: copy the first run's archive there, and on the device tool name
# that path in `carry`), else in the output folder; compile caches live in $GPU_CHECK_CACHE_ROOT
# (default ~/.cache/trinfer/gpu_check).
set -u -o pipefail
CALLER=$PWD
absolute() { case $1 in ""|/*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }  # paths given relative to the caller
if [ -n "${OUT:-}" ]; then OUT=$(absolute "$OUT"); fi
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
LIMITS_ONLY=0
CACHE_IN=$(absolute "${GPU_CHECK_CACHE:-}")
OUT_ARG=""
BUDGET=390
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --limits) DRY_RUN=1; LIMITS_ONLY=1 ;;
    --cache) CACHE_IN=$(absolute "$2"); shift ;;
    --out) OUT_ARG=$(absolute "$2"); shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

# ---- limits -------------------------------------------------------------------------------------------------
STAGES=(env build smoke sanitize tests_fast tests pack kernels e2e)
declare -A LIMIT=([env]=${T_ENV:-15} [build]=${T_BUILD:-100} [smoke]=${T_SMOKE:-85} [sanitize]=${T_SANITIZE:-40}
                  [tests_fast]=${T_TESTS_FAST:-40} [tests]=${T_TESTS:-60} [pack]=${T_PACK:-10}
                  [kernels]=${T_KERNELS:-35} [e2e]=${T_E2E:-35})
GRACE=5           # seconds between SIGINT and SIGKILL at a stage's limit
DEFAULT_BUDGET=390
if [ "$BUDGET" != "$DEFAULT_BUDGET" ]; then  # scale every limit to the budget (at least 5 s each)
  for s in "${STAGES[@]}"; do
    LIMIT[$s]=$(( LIMIT[$s] * (BUDGET - 9 * GRACE) / (DEFAULT_BUDGET - 9 * GRACE) ))
    [ "${LIMIT[$s]}" -ge 5 ] || LIMIT[$s]=5
  done
fi
# The build runs beside the smoke stage; the archive is written twice.
worst_case() {
  local overlap=$(( LIMIT[smoke] > LIMIT[build] ? LIMIT[smoke] : LIMIT[build] ))
  echo $(( LIMIT[env] + overlap + LIMIT[sanitize] + LIMIT[tests_fast] + LIMIT[tests] + 2 * LIMIT[pack]
           + LIMIT[kernels] + LIMIT[e2e] + 9 * GRACE ))
}

# ---- what the test stages run ----------------------------------------------------------------------------------
# Kernel and CUDA C++ test files: the fast pass (one process, CUDA_LAUNCH_BLOCKING=1, stop at the first failure).
FAST_TESTS=(tests/test_paged_attention.py tests/test_rotary.py tests/test_rms_norm.py tests/test_kv_cache.py
            tests/test_greedy_sample.py tests/test_lm_head.py tests/test_silu_and_mul.py tests/test_cuda_backend.py
            tests/test_gpu_scale.py)
FAST_K="not compiles_fullgraph"  # torch.compile tests: later, in the parallel pass
# The parallel pass: these first, then every other test file in name order.
FIRST_TESTS=(tests/test_backends.py tests/test_cuda_graphs.py tests/test_gpu_engine.py tests/test_engine.py
             tests/test_abort.py tests/test_cuda_jit.py tests/test_model_parity.py tests/test_torch_backend.py)
# CPU-only work that a GPU run need not repeat: the AOT and nvcc compile checks (they compile for sm_90/sm_80
# without a GPU), the pip wheel build, the CPU benchmark and host-overhead subprocesses, this script's dry run.
IGNORE_ON_GPU=(tests/test_compile_check.py tests/test_csrc_compile.py tests/test_gpu_check.py)
DESELECT_ON_GPU=(tests/test_bench.py::test_host_overhead_suite_runs tests/test_bench.py::test_cpu_bench_smoke
                 tests/test_cuda_backend.py::test_installing_without_cuda_still_works)
OUTPUT_FILES=(summary.txt gpu_check.log kernels.json kernels.md kernels.png e2e.json e2e.md gpu_cache.tar.gz)

all_test_files() { ls tests/test_*.py; }
ordered_tests() {  # FAST + FIRST + the rest, without the ignored files
  local f seen=" ${IGNORE_ON_GPU[*]} "
  for f in "${FAST_TESTS[@]}" "${FIRST_TESTS[@]}" $(all_test_files); do
    case $seen in *" $f "*) ;; *) echo "$f"; seen="$seen$f " ;; esac
  done
}

PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1

# ---- dry run ------------------------------------------------------------------------------------------------
if [ $DRY_RUN = 1 ]; then
  fail=0
  wc=$(worst_case)
  echo "gpu_check --dry-run: worst case ${wc}s (every stage at its limit + ${GRACE}s grace each) for a budget of ${BUDGET}s"
  for s in "${STAGES[@]}"; do printf '  %-10s %4ss\n' "$s" "${LIMIT[$s]}"; done
  if [ "$wc" -gt "$BUDGET" ]; then echo "FAIL: the stage limits add up to ${wc}s > ${BUDGET}s"; fail=1; fi
  if [ $LIMITS_ONLY = 1 ]; then exit $fail; fi
  if [ ${#OUTPUT_FILES[@]} -gt 8 ]; then echo "FAIL: ${#OUTPUT_FILES[@]} output files > 8"; fail=1; fi
  for f in bench/gpu_cases.py bench/gpu_sanitize.sh bench/gpu_cache.py bench/run_all.py bench/bench_e2e.py \
           bench/summarize.py; do
    [ -f "$f" ] || { echo "FAIL: $f is missing"; fail=1; }
  done
  bash -n bench/gpu_sanitize.sh || { echo "FAIL: bench/gpu_sanitize.sh does not parse"; fail=1; }
  for f in "${FAST_TESTS[@]}" "${FIRST_TESTS[@]}" "${IGNORE_ON_GPU[@]}"; do
    [ -f "$f" ] || { echo "FAIL: selected test file $f does not exist"; fail=1; }
  done
  # Every test id the stages name, as pytest collects it (collect-only: nothing runs).
  collected=$(mktemp)
  $PY -m pytest --collect-only -q -p no:cacheprovider $(ordered_tests) > "$collected" 2>&1
  rc=$?
  if [ $rc != 0 ] && [ $rc != 5 ]; then
    echo "FAIL: pytest --collect-only exited $rc:"; tail -n 15 "$collected"; fail=1
  fi
  for id in "${DESELECT_ON_GPU[@]}"; do
    grep -qxF "$id" "$collected" || { echo "FAIL: deselected test id $id is not collected"; fail=1; }
  done
  for f in "${FAST_TESTS[@]}" "${FIRST_TESTS[@]}"; do
    grep -q "^$f::" "$collected" || { echo "FAIL: $f collects no test"; fail=1; }
  done
  n_fast=$(grep -E "^($(IFS='|'; echo "${FAST_TESTS[*]}"))::" "$collected" | grep -vc 'compiles_fullgraph')
  echo "  collected $(grep -c '::' "$collected") tests in $(ordered_tests | wc -l) files ($n_fast in the fast pass);" \
       "deselected on a GPU: ${#DESELECT_ON_GPU[@]} ids, ${#IGNORE_ON_GPU[@]} files"
  rm -f "$collected"
  # The summary machinery, into a scratch folder: only declared files may appear there.
  scratch=$(mktemp -d)
  OUTDIR=$scratch
fi

# ---- run state ------------------------------------------------------------------------------------------------
if [ $DRY_RUN = 0 ]; then
  OUTDIR=${OUT:-${OUT_ARG:-bench/results/$(date -u +%F)}}
fi
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/summary.txt"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/trinfer_gpu_check.XXXXXX")
CACHE_ROOT=${GPU_CHECK_CACHE_ROOT:-$HOME/.cache/trinfer/gpu_check}
export TRITON_CACHE_DIR="$CACHE_ROOT/triton" TRINFER_CUDA_BUILD_DIR="$CACHE_ROOT/cuda" \
       TORCHINDUCTOR_CACHE_DIR="$CACHE_ROOT/inductor"
unset TRITON_INTERPRET
: > "$LOG"
T0=$SECONDS
declare -A STATUS SECS DETAIL
for s in "${STAGES[@]}"; do STATUS[$s]="-"; SECS[$s]=""; DETAIL[$s]=""; done

write_summary() {  # rewritten after every stage; printed last
  {
    echo "== trinfer GPU check: ${GPU_NAME:-GPU unknown} | $(date -u +%FT%TZ) | commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "== $((SECONDS - T0))s so far, budget ${BUDGET}s (worst case $(worst_case)s); files in $OUTDIR"
    echo "VERDICT: smoke ${STATUS[smoke]} | sanitize ${STATUS[sanitize]} | tests_fast ${STATUS[tests_fast]} |" \
         "tests ${STATUS[tests]} | build ${STATUS[build]} | kernels ${STATUS[kernels]} | e2e ${STATUS[e2e]}"
    printf '%-10s %-12s %5s %5s  %s\n' stage status secs limit detail
    for s in "${STAGES[@]}"; do
      printf '%-10s %-12s %5s %5s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${LIMIT[$s]}" "${DETAIL[$s]}"
    done
    if [ -s "$WORK/failures" ]; then echo; echo "-- first failures:"; head -n 40 "$WORK/failures"; fi
    if [ -f "$OUTDIR/kernels.json" ] || [ -f "$OUTDIR/e2e.json" ]; then
      echo
      for j in "$OUTDIR/kernels.json" "$OUTDIR/e2e.json"; do
        [ -f "$j" ] && { $PY -m bench.summarize "$j" 2>&1 | head -n 60 || echo "(summarize $j failed)"; }
      done
    fi
  } > "$SUMMARY.tmp"
  mv "$SUMMARY.tmp" "$SUMMARY"
}

# run_stage NAME COMMAND...: COMMAND under `timeout -s INT` of the stage's limit, its output appended to the log as
# it comes and kept in $WORK/NAME.out; status ok | FAIL(rc) | TIMEOUT; the detail line from stage_detail.
run_stage() {
  local name=$1; shift
  local start=$SECONDS rc
  echo "[gpu_check] $(date -u +%T) $name: start (limit ${LIMIT[$name]}s)"
  { echo; echo "===== $name: $* (limit ${LIMIT[$name]}s)"; } >> "$LOG"
  STATUS[$name]=running
  write_summary
  timeout -s INT -k $GRACE "${LIMIT[$name]}" "$@" 2>&1 | tee -a "$LOG" > "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  finish_stage "$name" "$rc" "$start"
}

finish_stage() {  # NAME RC START
  local name=$1 rc=$2 start=$3
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]=TIMEOUT ;;
    *) STATUS[$name]="FAIL($rc)" ;;
  esac
  stage_status_override "$name" "$rc"
  SECS[$name]=$((SECONDS - start))
  DETAIL[$name]=$(stage_detail "$name" "$WORK/$name.out" | head -n 1 | cut -c1-150)
  echo "===== $name: ${STATUS[$name]} in ${SECS[$name]}s: ${DETAIL[$name]}" >> "$LOG"
  echo "[gpu_check] $(date -u +%T) $name: ${STATUS[$name]} in ${SECS[$name]}s: ${DETAIL[$name]}"
  case ${STATUS[$name]} in
    ok|unavailable|incomplete|skipped*) ;;
    *) { echo "[$name] ${STATUS[$name]}: ${DETAIL[$name]}"; stage_failures "$name" "$WORK/$name.out"; echo; } >> "$WORK/failures" ;;
  esac
  write_summary
}

stage_status_override() {  # the sanitizer's own verdicts
  if [ "$1" = sanitize ]; then
    case $2 in 3) STATUS[sanitize]=unavailable ;; 4) STATUS[sanitize]=incomplete ;; esac
  fi
}

pytest_line() {  # the final "N passed, M failed ..." line, or a count so far
  local last cut=""
  grep -q 'KeyboardInterrupt' "$1" && cut="stopped at its limit: "
  last=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$' "$1" | tail -n 1 | tr -d '=' | sed 's/^ *//')
  if [ -n "$last" ]; then echo "$cut$last"
  else echo "${cut}no final line; so far $(grep -cE ' PASSED' "$1") passed, $(grep -cE ' FAILED' "$1") failed"
  fi
}

stage_detail() {  # NAME FILE: one line of what the stage found
  case $1 in
    env) grep -m1 '^gpu:' "$2" ;;
    build) grep -E '^\[load_jit\]|BuildError|Error' "$WORK/build.out" | tail -n 1 ;;
    smoke) local e2e
      e2e=$(grep -hE '^(ok  |FAIL) e2e' "$WORK/smoke-e2e.log" 2>/dev/null | tail -n 1 | cut -c1-70)
      echo "kernel cases: $(cat "$WORK"/smoke-[0-9c]*.log 2>/dev/null | grep -c '^ok ') ok," \
           "$(cat "$WORK"/smoke-[0-9c]*.log 2>/dev/null | grep -c '^FAIL') failed," \
           "$(cat "$WORK"/smoke-[0-9c]*.log 2>/dev/null | grep -c '^SKIP') skipped; e2e: ${e2e:-not finished}" ;;
    sanitize) grep -E '^sanitize: ' "$2" | tail -n 1 | sed 's/^sanitize: //' ;;
    tests_fast|tests) pytest_line "$2" ;;
    pack) grep -m1 '^gpu_cache:' "$2" ;;
    kernels) grep -m1 '^\[bench\] wrote' "$2" | sed 's/^\[bench\] //' ;;
    e2e) grep -m1 '^\[e2e\] wrote' "$2" | sed 's/^\[e2e\] //' ;;
  esac
}

stage_failures() {  # NAME FILE: the lines worth reading first
  case $1 in
    smoke) grep -h -A3 '^FAIL' "$WORK"/smoke-*.log 2>/dev/null | head -n 20 ;;
    sanitize) grep -E '^sanitize .*: (FAIL|TIMEOUT)' "$2" | head -n 6 ;;
    tests_fast|tests) grep -E '^(FAILED|ERROR) ' "$2" | head -n 15; grep -m3 -B2 -A8 'illegal memory access' "$2" | head -n 20 ;;
    *) tail -n 12 "$2" ;;
  esac
}

record_skip() {  # NAME REASON
  STATUS[$1]="skipped"; DETAIL[$1]=$2
  echo "===== $1: skipped ($2)" >> "$LOG"; echo "[gpu_check] $1: skipped ($2)"
  write_summary
}

if [ $DRY_RUN = 1 ]; then
  for s in "${STAGES[@]}"; do STATUS[$s]="dry-run"; done
  write_summary
  extra=$(ls -A "$OUTDIR" | grep -vxF -f <(printf '%s\n' "${OUTPUT_FILES[@]}") || true)
  [ -z "$extra" ] || { echo "FAIL: undeclared output files: $extra"; fail=1; }
  n=$(ls -A "$OUTDIR" | wc -l)
  echo "  the summary machinery wrote $n of the ${#OUTPUT_FILES[@]} declared files (<= 8): $(ls "$OUTDIR" | tr '\n' ' ')"
  rm -rf "$scratch" "$WORK"
  if [ $fail = 0 ]; then echo "gpu_check --dry-run: ok"; else echo "gpu_check --dry-run: FAILED"; fi
  exit $fail
fi

# ---- env (and the cache archive) ------------------------------------------------------------------------------
if [ -z "$CACHE_IN" ]; then
  for c in bench/results/tmp/gpu_cache.tar.gz "$OUTDIR/gpu_cache.tar.gz"; do
    if [ -f "$c" ]; then CACHE_IN=$c; break; fi
  done
fi
env_stage() {
  if [ -n "$CACHE_IN" ]; then
    if [ -f "$CACHE_IN" ]; then $PY -m bench.gpu_cache restore "$CACHE_IN" "$CACHE_ROOT" --csrc csrc \
      || echo "cache: restoring $CACHE_IN failed; compiling from scratch"
    else echo "cache: $CACHE_IN not found; compiling from scratch"; fi
  else echo "cache: none given or found (--cache, \$GPU_CHECK_CACHE, bench/results/tmp/gpu_cache.tar.gz)"; fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1 || true
  echo "cpus: $(nproc)  compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || echo absent)  nvcc: $(command -v nvcc || echo absent)"
  $PY - <<'EOF'
import platform, torch, triton
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print('gpu:', p.name if p else 'NO CUDA GPU', '| cc', f'{p.major}.{p.minor}' if p else '-', '| torch', torch.__version__,
      '| CUDA', torch.version.cuda, '| triton', triton.__version__, '| python', platform.python_version())
for m in ('transformers', 'numpy', 'pytest', 'xdist', 'pytest_timeout', 'gguf'):
    try:
        mod = __import__(m)
        print(m, getattr(mod, '__version__', 'present'))
    except ImportError:
        print(m, 'absent')
raise SystemExit(0 if p else 3)
EOF
}
export -f env_stage
export PY CACHE_IN CACHE_ROOT
run_stage env bash -c env_stage
GPU_NAME=$(grep -m1 '^gpu:' "$WORK/env.out" | sed 's/^gpu: //; s/ |.*//')
write_summary
if [ "${STATUS[env]}" != ok ]; then
  echo "[gpu_check] no usable CUDA GPU: stopping here"
  cat "$SUMMARY"
  exit 1
fi
has_module() { $PY -c "import $1" 2>/dev/null; }

# ---- build (background), smoke --------------------------------------------------------------------------------
# The build, then (within the same limit) the CUDA C++ kernels' smoke cases, beside the smoke stage.
build_stage() {
  MAX_JOBS=${MAX_JOBS:-8} $PY -c "
import time, trinfer.cuda_kernels as ck
t = time.time()
print('[load_jit]', ck.load_jit(verbose=True, timeout_s=max(5, $1 - 15)), f'loaded in {time.time() - t:.0f}s', flush=True)
" || return
  touch "$WORK/built"
  $PY -m bench.gpu_cases --backend cuda > "$WORK/smoke-cuda.log" 2>&1
}
export -f build_stage
export PY WORK
BUILD_START=$SECONDS
{ echo; echo "===== build (background): load_jit, then the CUDA C++ smoke cases (limit ${LIMIT[build]}s)"; } >> "$LOG"
STATUS[build]=running
timeout -s INT -k $GRACE "${LIMIT[build]}" bash -c "build_stage ${LIMIT[build]}" > "$WORK/build.out" 2>&1 &
BUILD_PID=$!

smoke_stage() {
  local pids=() rc=0 i
  for i in 0 1 2 3; do
    $PY -m bench.gpu_cases --backend triton --shard $i/4 > "$WORK/smoke-$i.log" 2>&1 & pids+=($!)
  done
  $PY -m bench.gpu_cases --e2e > "$WORK/smoke-e2e.log" 2>&1 & pids+=($!)
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  return $rc
}
export -f smoke_stage
run_stage smoke bash -c smoke_stage

wait $BUILD_PID
build_rc=$?
cat "$WORK/build.out" >> "$LOG"
cat "$WORK"/smoke-*.log >> "$LOG"  # (each process's own log: a cut stage leaves them too)
[ -f "$WORK/built" ] && build_rc=0  # built; the CUDA C++ cases count in the smoke stage
finish_stage build $build_rc $BUILD_START
if [ "${STATUS[build]}" = ok ]; then
  export TRINFER_BENCH_JIT=1
  if grep -q '^FAIL' "$WORK/smoke-cuda.log" 2>/dev/null; then
    STATUS[smoke]="FAIL(cuda)"
    stage_failures smoke /dev/null >> "$WORK/failures"
  fi
  DETAIL[smoke]=$(stage_detail smoke /dev/null | cut -c1-150)
  write_summary
else
  export TRINFER_TEST_CUDA_JIT=0 SANITIZE_CSRC=0  # tests skip the CUDA C++ cases, saying why
fi

# ---- sanitize -------------------------------------------------------------------------------------------------
T_SANITIZE=$(( LIMIT[sanitize] - GRACE - 2 )) run_stage sanitize bash bench/gpu_sanitize.sh "$WORK"
for f in "$WORK"/sanitize-*.log; do [ -f "$f" ] && { echo "----- $f"; cat "$f"; } >> "$LOG"; done

# ---- tests: the fast pass, then the rest ------------------------------------------------------------------------
PYTEST=(-m pytest -p no:cacheprovider -rfE)
has_module pytest_timeout && PYTEST+=(--timeout=90)
CUDA_LAUNCH_BLOCKING=1 run_stage tests_fast $PY "${PYTEST[@]}" -x -v -k "$FAST_K" "${FAST_TESTS[@]}"
# Whatever the fast pass ran (passed or failed) is not run again.
DONE_IDS=()
while IFS= read -r id; do DONE_IDS+=(--deselect "$id"); done < <(sed -n 's/^\(tests\/[^ ]*\) \(PASSED\|FAILED\|ERROR\|SKIPPED\|XFAIL\|XPASS\).*/\1/p' "$WORK/tests_fast.out")
ARGS=(-v --durations=15)
for f in "${IGNORE_ON_GPU[@]}"; do ARGS+=(--ignore "$f"); done
for id in "${DESELECT_ON_GPU[@]}"; do ARGS+=(--deselect "$id"); done
if has_module xdist && [ "${TEST_WORKERS:-8}" != 0 ]; then ARGS+=(-n "${TEST_WORKERS:-8}" --dist loadfile); fi
run_stage tests $PY "${PYTEST[@]}" "${ARGS[@]}" ${DONE_IDS[@]+"${DONE_IDS[@]}"} $(ordered_tests)

# ---- the archive, the benchmarks, the archive again -----------------------------------------------------------
pack_stage() { $PY -m bench.gpu_cache pack "$OUTDIR/gpu_cache.tar.gz" "$CACHE_ROOT" --csrc csrc --limit-mib 15; }
export -f pack_stage
export OUTDIR
run_stage pack bash -c pack_stage
run_stage kernels $PY -m bench.run_all --quick --out "$OUTDIR" --budget-s $(( LIMIT[kernels] - 15 ))
if [ -f bench/bench_e2e.py ]; then
  run_stage e2e $PY -m bench.bench_e2e --quick --out "$OUTDIR" --budget-s $(( LIMIT[e2e] - 10 )) --no-plot
else
  record_skip e2e "bench/bench_e2e.py not found"
fi
PACK_FIRST="${STATUS[pack]}|${SECS[pack]}"
run_stage pack bash -c pack_stage
SECS[pack]="${PACK_FIRST#*|}+${SECS[pack]}"

# ---- the end ----------------------------------------------------------------------------------------------------
extra=$(ls -A "$OUTDIR" | grep -vxF -f <(printf '%s\n' "${OUTPUT_FILES[@]}") || true)
[ -z "$extra" ] || echo "[gpu_check] note: $OUTDIR also holds files this run did not write: $extra"
write_summary
cat "$SUMMARY" >> "$LOG"
rm -rf "$WORK"
echo
cat "$SUMMARY"
for s in "${STAGES[@]}"; do
  case ${STATUS[$s]} in FAIL*|TIMEOUT) exit 1 ;; esac
done
exit 0
