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
#   env          12 T_ENV          restore the cache archive; GPU, driver, versions, tools present
#   build       105 T_BUILD        the CUDA C++ JIT build (load_jit, MAX_JOBS=8), then its kernels' smoke cases, in
#                                  the background beside smoke and tests_fast
#   smoke        52 T_SMOKE        every kernel once natively against its reference (bench/gpu_cases.py, 4
#                                  processes), and two generates against transformers with CUDA graphs and the async
#                                  loop: staggered arrivals; Qwen3 with prefix-cache hits, chunks and KV splits
#   tests_fast   43 T_TESTS_FAST   the linear kernel's bitwise batch-invariance tests, then the kernel test files,
#                                  one process, CUDA_LAUNCH_BLOCKING=1, stopping at the first failure
#   sanitize     50 T_SANITIZE     compute-sanitizer: memcheck over every kernel case, racecheck + synccheck over
#                                  csrc/ (bench/gpu_sanitize.sh), in the background beside tests; "unavailable",
#                                  not a failure, where the tool does not work
#   tests        70 T_TESTS        the rest, the GPU tests of the engine and the new features first (CUDA graphs,
#                                  engine vs transformers, one-GPU NCCL under graphs, quantized linear, prefix
#                                  caching, Qwen3), pytest-xdist workers, per-test timeout; CPU-only checks left out
#   pack          8 T_PACK         the cache archive (Triton cache + CUDA C++ build + Inductor cache, <= 15 MiB)
#   kernels      25 T_KERNELS      kernel benchmarks (python -m bench.run_all --quick; linear: a short row set)
#   e2e          45 T_E2E          end-to-end: Llama-3.2-1B, Llama-3-8B, Qwen3-8B, trinfer vs transformers eager;
#                                  then trinfer with int4 weights (Llama-3.2-1B)
#   prefix_chunk 30 T_PREFIX_CHUNK chunked prefill (ITL of 4 streams while an 8K prompt arrives, per
#                                  max_num_batched_tokens: none, 2048, 512, 128: is the CUDA default 512 right?),
#                                  then prefix caching (TTFT with a cached 2K prefix), Llama-3.2-1B
#   spec         40 T_SPEC         speculative decoding (bench/bench_spec.py: n-gram on repetitive prompts, 1B and 8B shapes)
#   pack          8                the archive again, with what the benchmarks compiled
# pytest and Python stages are stopped with SIGINT at their limit (pytest then prints its summary and tracebacks),
# killed 5 s later if still running; PYTHONFAULTHANDLER=1 prints the stacks of a crash. Worst case, every stage at
# its limit plus that grace: 388 s (checked by --dry-run, at most 390). The summary (a verdict per stage and per
# feature) is rewritten after every stage and printed last; exit status 1 when a stage failed or timed out.
#
# Output (at most 8 files): $OUT when set, else --out DIR, else bench/results/<UTC date>/: summary.txt,
# gpu_check.log (every stage's full output), gpu_cache.tar.gz, kernels.json, e2e.json, prefix_chunk.json, spec.json
# (tables and plots from them: python -m bench.gpu_results render DIR DEST). A second run finds the archive given by
# --cache or $GPU_CHECK_CACHE, else bench/results/tmp/gpu_cache.tar.gz (git-ignored: copy the first run's archive
# there, and on the device tool name that path in `carry`), else in the output folder; compile caches live in
# $GPU_CHECK_CACHE_ROOT (default ~/.cache/trinfer/gpu_check).
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
STAGES=(env build smoke tests_fast sanitize tests pack kernels e2e prefix_chunk spec)
declare -A LIMIT=([env]=${T_ENV:-12} [build]=${T_BUILD:-105} [smoke]=${T_SMOKE:-52} [tests_fast]=${T_TESTS_FAST:-43}
                  [sanitize]=${T_SANITIZE:-50} [tests]=${T_TESTS:-70} [pack]=${T_PACK:-8} [kernels]=${T_KERNELS:-25}
                  [e2e]=${T_E2E:-45} [prefix_chunk]=${T_PREFIX_CHUNK:-30} [spec]=${T_SPEC:-40})
declare -A MIN_LIMIT=([env]=10)  # the env stage imports torch and restores the archive; others: at least 5 s
GRACE=5           # seconds between SIGINT and SIGKILL at a stage's limit
DEFAULT_BUDGET=390
# The build runs beside smoke + tests_fast, the sanitizer beside tests; the archive is written twice.
worst_case() {
  local front=$(( LIMIT[smoke] + LIMIT[tests_fast] + GRACE ))
  front=$(( front > LIMIT[build] ? front : LIMIT[build] ))
  local middle=$(( LIMIT[tests] > LIMIT[sanitize] ? LIMIT[tests] : LIMIT[sanitize] ))
  echo $(( LIMIT[env] + front + middle + 2 * LIMIT[pack] + LIMIT[kernels] + LIMIT[e2e] + LIMIT[prefix_chunk]
           + LIMIT[spec] + 9 * GRACE ))
}
if [ "$BUDGET" != "$DEFAULT_BUDGET" ]; then  # scale every limit to the budget (floors kept, then trimmed to fit)
  declare -A BASE
  for s in "${STAGES[@]}"; do BASE[$s]=${LIMIT[$s]}; done
  default_wc=$(worst_case)
  target=$BUDGET
  for _ in 1 2 3 4 5; do
    for s in "${STAGES[@]}"; do
      LIMIT[$s]=$(( BASE[$s] * (target - 9 * GRACE) / (default_wc - 9 * GRACE) ))
      floor=${MIN_LIMIT[$s]:-5}
      [ "${LIMIT[$s]}" -ge "$floor" ] || LIMIT[$s]=$floor
    done
    over=$(( $(worst_case) - BUDGET ))
    [ $over -gt 0 ] || break
    target=$(( target - over ))
  done
fi

# ---- what the test stages run ----------------------------------------------------------------------------------
# The fast pass (one process, CUDA_LAUNCH_BLOCKING=1, stop at the first failure): the key hardware check of the
# quantized linear kernel (a row alone is bitwise the same in any batch), then the kernel and CUDA C++ test files.
FAST_TESTS=(tests/test_linear.py::test_batch_invariance_and_row_counts tests/test_linear.py::test_more_rows_than_one_launch
            tests/test_paged_attention.py tests/test_rotary.py tests/test_rms_norm.py tests/test_kv_cache.py
            tests/test_greedy_sample.py tests/test_lm_head.py tests/test_silu_and_mul.py tests/test_cuda_backend.py
            tests/test_gpu_scale.py)
FAST_K="not compiles_fullgraph"  # torch.compile tests: later, in the parallel pass
# The parallel pass: the engine's and the new features' GPU tests first (entries with ::ids run only those ids of
# their file), then whatever the fast pass did not reach, then every other test file in name order, LAST_TESTS last.
FIRST_TESTS=(tests/test_gpu_engine.py tests/test_cuda_graphs.py tests/test_backends.py tests/test_engine.py
             tests/test_abort.py tests/test_tensor_parallel.py::test_nccl_collectives_inside_decode_cuda_graphs_one_gpu
             tests/test_linear.py tests/test_quantization.py tests/test_prefix_caching.py tests/test_qwen3.py
             tests/test_cuda_jit.py tests/test_model_parity.py tests/test_prefix_cache.py)
# Speculative decoding's tests, where they exist (not required by the dry run): right after FIRST_TESTS.
OPTIONAL_TESTS=(tests/test_spec*.py tests/test_speculative*.py)
# CPU-side files of least value on a GPU (the benchmarks' smoke runs, which the bench stages repeat for real; the
# profiler; the server, which must skip cleanly without starlette/uvicorn/httpx/openai).
LAST_TESTS=(tests/test_bench.py tests/test_profile.py tests/test_server.py)
# CPU-only work that a GPU run need not repeat: the AOT and nvcc compile checks (they compile for sm_90/sm_80
# without a GPU), this script's dry run, the hostile-input suite (host-side parsing, 4 worker processes), the pip
# wheel build, the CPU benchmark and host-overhead subprocesses.
IGNORE_ON_GPU=(tests/test_compile_check.py tests/test_csrc_compile.py tests/test_gpu_check.py
               tests/test_hostile_inputs.py)
DESELECT_ON_GPU=(tests/test_bench.py::test_host_overhead_suite_runs tests/test_bench.py::test_cpu_bench_smoke
                 tests/test_cuda_backend.py::test_installing_without_cuda_still_works)
# The linear benchmark's short row set (its --quick sweep has 96 cases): the widest and the longest products of
# Llama-3-8B at 1 and 16 rows, every format.
LINEAR_CASES='^Llama-3-8B (gate_up|down) M=(1|16)$'
KERNEL_ORDER=decode_attention,linear,prefill_attention,rms_norm,silu_and_mul,rotary,kv_cache,sampling
OUTPUT_FILES=(summary.txt gpu_check.log gpu_cache.tar.gz kernels.json e2e.json prefix_chunk.json spec.json)

optional_tests() { local f; for f in "${OPTIONAL_TESTS[@]}"; do [ -f "$f" ] && echo "$f"; done; return 0; }
parallel_tests() {  # the parallel pass's files and ids, in order, without the ignored files
  local e f phase=first whole=" ${IGNORE_ON_GPU[*]} " restricted=" " ids=" " late=" ${LAST_TESTS[*]} "
  for e in "${FIRST_TESTS[@]}" $(optional_tests) "${FAST_TESTS[@]%%::*}" $(ls tests/test_*.py) @ "${LAST_TESTS[@]}"; do
    if [ "$e" = @ ]; then phase=last; continue; fi
    f=${e%%::*}
    if [ "$e" = "$f" ]; then  # a whole file, unless it came already (whole or as ids) or belongs at the end
      case "$whole$restricted" in *" $f "*) continue ;; esac
      [ $phase = first ] && case $late in *" $f "*) continue ;; esac
      whole="$whole$f "
    else                      # an id: only it of its file
      case "$whole" in *" $f "*) continue ;; esac
      case "$ids" in *" $e "*) continue ;; esac
      ids="$ids$e "; restricted="$restricted$f "
    fi
    echo "$e"
  done
}

PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1

# ---- dry run ------------------------------------------------------------------------------------------------
if [ $DRY_RUN = 1 ]; then
  fail=0
  wc=$(worst_case)
  echo "gpu_check --dry-run: worst case ${wc}s (every stage at its limit + ${GRACE}s grace each) for a budget of ${BUDGET}s"
  for s in "${STAGES[@]}"; do printf '  %-12s %4ss\n' "$s" "${LIMIT[$s]}"; done
  if [ "$wc" -gt "$BUDGET" ]; then echo "FAIL: the stage limits add up to ${wc}s > ${BUDGET}s"; fail=1; fi
  if [ $LIMITS_ONLY = 1 ]; then exit $fail; fi
  if [ ${#OUTPUT_FILES[@]} -gt 8 ]; then echo "FAIL: ${#OUTPUT_FILES[@]} output files > 8"; fail=1; fi
  for f in bench/gpu_cases.py bench/gpu_sanitize.sh bench/gpu_cache.py bench/gpu_verdict.py bench/gpu_results.py \
           bench/run_all.py bench/bench_e2e.py bench/bench_prefix_chunk.py bench/summarize.py; do
    [ -f "$f" ] || { echo "FAIL: $f is missing"; fail=1; }
  done
  bash -n bench/gpu_sanitize.sh || { echo "FAIL: bench/gpu_sanitize.sh does not parse"; fail=1; }
  for f in "${FAST_TESTS[@]%%::*}" "${FIRST_TESTS[@]%%::*}" "${LAST_TESTS[@]}" "${IGNORE_ON_GPU[@]}"; do
    [ -f "$f" ] || { echo "FAIL: selected test file $f does not exist"; fail=1; }
  done
  # Every test id the stages name, as pytest collects it (collect-only: nothing runs).
  collected=$(mktemp)
  $PY -m pytest --collect-only -q -p no:cacheprovider $(parallel_tests) > "$collected" 2>&1
  rc=$?
  if [ $rc != 0 ] && [ $rc != 5 ]; then
    echo "FAIL: pytest --collect-only exited $rc:"; tail -n 15 "$collected"; fail=1
  fi
  for id in "${DESELECT_ON_GPU[@]}"; do
    grep -qxF "$id" "$collected" || { echo "FAIL: deselected test id $id is not collected"; fail=1; }
  done
  for e in "${FAST_TESTS[@]}" "${FIRST_TESTS[@]}"; do
    case $e in
      *::*) grep -q "^$e\(\[.*\]\)\{0,1\}$" "$collected" || { echo "FAIL: selected test id $e is not collected"; fail=1; } ;;
      *) grep -q "^$e::" "$collected" || { echo "FAIL: $e collects no test"; fail=1; } ;;
    esac
  done
  n_fast=$(grep -E "^($(IFS='|'; echo "${FAST_TESTS[*]}"))(::|\[|$)" "$collected" | grep -vc 'compiles_fullgraph')
  echo "  collected $(grep -c '::' "$collected") tests in $(parallel_tests | wc -l) files or ids ($n_fast in the" \
       "fast pass); deselected on a GPU: ${#DESELECT_ON_GPU[@]} ids, ${#IGNORE_ON_GPU[@]} files"
  # Every feature the summary gives a verdict on has tests in the selection (speculative decoding: optional).
  echo "  selected tests per feature:"
  $PY -m bench.gpu_verdict selection "$collected" || { echo "FAIL: a feature has no selected test"; fail=1; }
  rm -f "$collected"
  # The linear benchmark's row set selects rows, in the order the kernels stage asks for.
  n_linear=$($PY -c "
import sys, torch
from bench import run_all
b = run_all.collect('$KERNEL_ORDER'.split(','), {'linear': sys.argv[1]})
print(sum(len(x.cases('quick', torch.bfloat16)) for x in b if x.kernel.startswith('linear[')))" "$LINEAR_CASES" 2>&1)
  if [[ "$n_linear" =~ ^[0-9]+$ ]] && [ "$n_linear" -gt 0 ]; then
    echo "  kernels stage: run_all --only $KERNEL_ORDER, $n_linear linear cases ($LINEAR_CASES)"
  else
    echo "FAIL: the linear row set '$LINEAR_CASES' selects no case: $n_linear"; fail=1
  fi
  # The summary machinery, into a scratch folder: only declared files may appear there.
  scratch=$(mktemp -d)
  OUTDIR=$scratch
fi

# ---- run state ------------------------------------------------------------------------------------------------
if [ $DRY_RUN = 0 ]; then
  OUTDIR=${OUT:-${OUT_ARG:-bench/results/$(date -u +%F)}}
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
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
  local s status_args=()
  for s in "${STAGES[@]}"; do status_args+=(--status "$s=${STATUS[$s]}"); done
  {
    echo "== trinfer GPU check: ${GPU_NAME:-GPU unknown} | $(date -u +%FT%TZ) | commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "== $((SECONDS - T0))s so far, budget ${BUDGET}s (worst case $(worst_case)s); files in $OUTDIR"
    echo "VERDICT: smoke ${STATUS[smoke]} | tests_fast ${STATUS[tests_fast]} | tests ${STATUS[tests]} |" \
         "sanitize ${STATUS[sanitize]} | build ${STATUS[build]} | kernels ${STATUS[kernels]} | e2e ${STATUS[e2e]} |" \
         "prefix_chunk ${STATUS[prefix_chunk]} | spec ${STATUS[spec]}"
    echo "FEATURES (ok: something ran and nothing failed; FAIL; skipped; not run):"
    $PY -m bench.gpu_verdict features "$WORK" "$OUTDIR" "${status_args[@]}" 2>&1 || echo "  (feature verdicts failed)"
    printf '%-12s %-12s %5s %5s  %s\n' stage status secs limit detail
    for s in "${STAGES[@]}"; do
      printf '%-12s %-12s %5s %5s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${LIMIT[$s]}" "${DETAIL[$s]}"
    done
    if [ -s "$WORK/failures" ]; then echo; echo "-- first failures:"; head -n 40 "$WORK/failures"; fi
    for j in "$OUTDIR/kernels.json" "$OUTDIR/e2e.json"; do
      [ -f "$j" ] && { echo; $PY -m bench.summarize "$j" 2>&1 | head -n 60 || echo "(summarize $j failed)"; }
    done
    if [ -f "$OUTDIR/prefix_chunk.json" ] || [ -f "$OUTDIR/spec.json" ]; then
      echo; $PY -m bench.gpu_results lines "$OUTDIR" 2>&1 | head -n 30
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

# start_bg NAME COMMAND...: the same in the background (output in $WORK/NAME.out, appended to the log when done);
# wait_bg NAME: wait for it and record it.
declare -A BG_PID BG_START
start_bg() {
  local name=$1; shift
  echo "[gpu_check] $(date -u +%T) $name: start in the background (limit ${LIMIT[$name]}s)"
  { echo; echo "===== $name (background): $* (limit ${LIMIT[$name]}s)"; } >> "$LOG"
  STATUS[$name]=running
  BG_START[$name]=$SECONDS
  timeout -s INT -k $GRACE "${LIMIT[$name]}" "$@" > "$WORK/$name.out" 2>&1 &
  BG_PID[$name]=$!
}
wait_bg() {  # NAME -> its exit status in BG_RC
  wait "${BG_PID[$1]}"
  BG_RC=$?
  { echo "----- $1 (background) output:"; cat "$WORK/$1.out"; } >> "$LOG"
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

stage_status_override() {  # NAME RC: the sanitizer's own verdicts; a benchmark cut by its limit keeps what it wrote
  case $1 in
    sanitize) case $2 in 3) STATUS[sanitize]=unavailable ;; 4) STATUS[sanitize]=incomplete ;; esac ;;
    env) [ "$2" != 3 ] && grep -q '^gpu: ' "$WORK/env.out" && ! grep -q '^gpu: NO CUDA' "$WORK/env.out" \
           && [ "${STATUS[env]}" = TIMEOUT ] && STATUS[env]=ok ;;  # slow, but the GPU answered
  esac
  return 0
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
      e2e=$(grep -hE '^(ok  |FAIL) e2e[-a-z]*:' "$WORK"/smoke-e2e*.log 2>/dev/null \
            | sed -E 's/^(ok|FAIL) +(e2e[-a-z]*):.*/\2 \1/' | sort | tr '\n' ',' | sed 's/,$//; s/,/, /g')
      echo "kernel cases: $(cat "$WORK"/smoke-[0-9c]*.log 2>/dev/null | grep -c '^ok ') ok," \
           "$(cat "$WORK"/smoke-[0-9c]*.log 2>/dev/null | grep -c '^FAIL') failed," \
           "$(cat "$WORK"/smoke-[0-9c]*.log 2>/dev/null | grep -c '^SKIP') skipped; ${e2e:-e2e: not finished}" ;;
    sanitize) grep -E '^sanitize: ' "$2" | tail -n 1 | sed 's/^sanitize: //' ;;
    tests_fast|tests) pytest_line "$2" ;;
    pack) grep -m1 '^gpu_cache:' "$2" ;;
    kernels|e2e|prefix_chunk|spec) grep -E '^gpu_results: ' "$WORK/$1.collected" 2>/dev/null | sed 's/^gpu_results: //' ;;
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
  grep -q '^  kernels ' "$SUMMARY" || { echo "FAIL: the summary has no feature verdicts"; fail=1; }
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
for m in ('transformers', 'numpy', 'pytest', 'xdist', 'pytest_timeout', 'gguf', 'starlette', 'uvicorn', 'httpx',
          'openai'):
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

# ---- build (background) beside smoke and the fast test pass ----------------------------------------------------
# The build, then (within the same limit) the CUDA C++ kernels' smoke cases.
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
start_bg build bash -c "build_stage ${LIMIT[build]}"

smoke_stage() {
  local pids=() rc=0 i
  for i in 0 1 2 3; do
    $PY -m bench.gpu_cases --backend triton --shard $i/4 > "$WORK/smoke-$i.log" 2>&1 & pids+=($!)
  done
  $PY -m bench.gpu_cases --e2e staggered > "$WORK/smoke-e2e.log" 2>&1 & pids+=($!)
  $PY -m bench.gpu_cases --e2e prefix > "$WORK/smoke-e2e-prefix.log" 2>&1 & pids+=($!)
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  return $rc
}
export -f smoke_stage
run_stage smoke bash -c smoke_stage
for f in "$WORK"/smoke-[0-9e]*.log; do [ -f "$f" ] && { echo "----- $f"; cat "$f"; } >> "$LOG"; done

# The fast pass: one process, CUDA_LAUNCH_BLOCKING=1, first failure stops it. The CUDA C++ cases run only if the
# build has finished (TRINFER_TEST_CUDA_JIT=0: load a finished build, never start one); else they skip here and
# run in the parallel pass.
PYTEST=(-m pytest -p no:cacheprovider -rfE)
has_module pytest_timeout && PYTEST+=(--timeout=90)
for id in "${DESELECT_ON_GPU[@]}"; do PYTEST+=(--deselect "$id"); done
CUDA_LAUNCH_BLOCKING=1 TRINFER_TEST_CUDA_JIT=0 run_stage tests_fast $PY "${PYTEST[@]}" -x -v -k "$FAST_K" \
  "${FAST_TESTS[@]}"

wait_bg build
build_rc=$BG_RC
[ -f "$WORK/smoke-cuda.log" ] && { echo "----- $WORK/smoke-cuda.log"; cat "$WORK/smoke-cuda.log"; } >> "$LOG"
[ -f "$WORK/built" ] && build_rc=0  # built; the CUDA C++ cases count in the smoke stage
finish_stage build "$build_rc" "${BG_START[build]}"
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

# ---- sanitize (background) beside the parallel test pass ---------------------------------------------------------
T_SANITIZE=$(( LIMIT[sanitize] - GRACE - 2 )) start_bg sanitize bash bench/gpu_sanitize.sh "$WORK"
# Whatever the fast pass got through (passed or failed) is not run again; what it skipped gets another chance.
DONE_IDS=()
while IFS= read -r id; do [ -n "$id" ] && DONE_IDS+=(--deselect "$id"); done < <($PY -m bench.gpu_verdict done-ids "$WORK/tests_fast.out")
ARGS=(-v --durations=15)
for f in "${IGNORE_ON_GPU[@]}"; do ARGS+=(--ignore "$f"); done
# --dist load: tests go to the workers in this order, a file's tests over several workers (the kernel files'
# parameter sweeps compile in parallel); TEST_DIST=loadfile keeps each file on one worker.
if has_module xdist && [ "${TEST_WORKERS:-12}" != 0 ]; then ARGS+=(-n "${TEST_WORKERS:-12}" --dist "${TEST_DIST:-load}"); fi
mapfile -t PARALLEL < <(parallel_tests)
run_stage tests $PY "${PYTEST[@]}" "${ARGS[@]}" ${DONE_IDS[@]+"${DONE_IDS[@]}"} "${PARALLEL[@]}"
wait_bg sanitize
finish_stage sanitize "$BG_RC" "${BG_START[sanitize]}"
for f in "$WORK"/sanitize-*.log; do [ -f "$f" ] && { echo "----- $f"; cat "$f"; } >> "$LOG"; done

# ---- the archive, the benchmarks, the archive again -----------------------------------------------------------
pack_stage() { $PY -m bench.gpu_cache pack "$OUTDIR/gpu_cache.tar.gz" "$CACHE_ROOT" --csrc csrc --limit-mib 15; }
export -f pack_stage
export OUTDIR
run_stage pack bash -c pack_stage
PACK_FIRST="${STATUS[pack]}|${SECS[pack]}"

# Each benchmark writes into $WORK/<stage>/; its JSON is copied to the output folder after the stage (also when
# cut: the scripts write after every row or part).
collect_results() {  # STAGE: its result file into the output folder, and what it holds as the stage's detail
  case $1 in
    e2e) $PY -m bench.gpu_results merge-e2e "$OUTDIR/e2e.json" "$WORK/e2e/e2e.json" "$WORK/e2e_int4/e2e.json" ;;
    *) $PY -m bench.gpu_results collect "$WORK/$1" "$OUTDIR/$1.json" ;;
  esac > "$WORK/$1.collected" 2>&1
  cat "$WORK/$1.collected" >> "$LOG"
  DETAIL[$1]=$(stage_detail "$1" /dev/null | head -n 1 | cut -c1-150)
  write_summary
}
run_stage kernels $PY -m bench.run_all --quick --out "$WORK/kernels" --budget-s $(( LIMIT[kernels] - 12 )) --no-plot \
  --only "$KERNEL_ORDER" --cases "linear=$LINEAR_CASES"
collect_results kernels

e2e_stage() {  # LIMIT: the dense run (3 shapes, trinfer then transformers eager), then trinfer on int4 weights
  local t0=$SECONDS rc=0 first=$(( $1 * 3 / 5 )) left
  timeout -s INT -k 3 $first $PY -m bench.bench_e2e --quick --shapes Llama-3.2-1B,Llama-3-8B,Qwen3-8B \
    --out "$WORK/e2e" --budget-s $(( first - 8 )) --no-plot || rc=$?
  left=$(( $1 - (SECONDS - t0) - 4 ))
  [ $left -gt 8 ] || { echo "[e2e] no time left for the int4 run"; return $rc; }
  timeout -s INT -k 3 $left $PY -m bench.bench_e2e --quick --shapes Llama-3.2-1B --systems trinfer --quantize int4 \
    --out "$WORK/e2e_int4" --budget-s $(( left - 6 )) --no-plot || rc=$?
  return $rc
}
export -f e2e_stage
run_stage e2e bash -c "e2e_stage ${LIMIT[e2e]}"
collect_results e2e

# max_num_batched_tokens 512 is the CUDA default (an estimate from the FLOP count): the itl part's rows confirm or
# correct it, so it runs first (each part is written when done); the prefix part's TTFT with a cached 2K prefix after.
run_stage prefix_chunk $PY -m bench.bench_prefix_chunk --device cuda --shape Llama-3.2-1B --parts itl,prefix \
  --reps 2 --budgets none,2048,512,128 --out "$WORK/prefix_chunk"
collect_results prefix_chunk

# Speculative decoding: wired when bench/bench_spec.py lands (its tests, tests/test_spec*.py, run in the tests stage).
if [ -f bench/bench_spec.py ]; then
  run_stage spec $PY -m bench.bench_spec --device cuda --quick --out "$WORK/spec"
  collect_results spec
else
  record_skip spec "bench/bench_spec.py not found"
fi

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
