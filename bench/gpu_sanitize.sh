#!/usr/bin/env bash
# compute-sanitizer over every kernel: memcheck on all the cases of bench/gpu_cases.py (Triton and CUDA C++),
# racecheck and synccheck on its CUDA C++ (csrc/) cases. The cases are one small prefill and decode of every
# kernel with padding rows (decode length 0, KV slot -1, a prefill sequence with no query), block_size 1 and 256,
# head_dim 64/80/96/128 and decode lengths 255/256/257 (see bench/gpu_cases.py).
#
#   bash bench/gpu_sanitize.sh [LOG_DIR]      # from the repository root or anywhere; logs in LOG_DIR (default /tmp)
#
# The four runs (memcheck in two shards, racecheck, synccheck) go at once, each under `timeout -s INT` of
# T_SANITIZE seconds (default 40). Run bench/gpu_cases.py natively first (bench/gpu_check.sh's smoke stage does):
# the Triton kernels are then compiled and cached, so the sanitized runs only launch them. Caching allocators are
# off (PYTORCH_NO_CUDA_MEMORY_CACHING=1): every tensor is its own allocation, so a read past one is caught.
# SANITIZE_CSRC=0 skips racecheck and synccheck (no CUDA C++ build). SANITIZER: the compute-sanitizer binary.
#
# One line per run, `sanitize <run>: <status> <detail>`, status ok | FAIL | TIMEOUT | unavailable | skipped, then
# `sanitize: <overall>`. Exit 0: every run clean; 1: a tool reported errors or a case failed under it; 3:
# compute-sanitizer absent or not working here (some container runtimes: "unavailable"; not a failure of the
# code); 4: no errors found, but a run was cut by its limit or could not run.
set -u -o pipefail
LOG_DIR=${1:-${TMPDIR:-/tmp}}
case $LOG_DIR in /*) ;; *) LOG_DIR="$PWD/$LOG_DIR" ;; esac
cd "$(dirname "$0")/.."
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python3}
T=${T_SANITIZE:-40}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1

find_sanitizer() {
  if [ -n "${SANITIZER:-}" ]; then echo "$SANITIZER"; return; fi
  command -v compute-sanitizer && return
  local c
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer \
           /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
    if [ -x "$c" ]; then echo "$c"; return; fi
  done
}
SAN=$(find_sanitizer)
if [ -z "$SAN" ] || [ ! -x "$SAN" ]; then
  echo "sanitize: unavailable (no compute-sanitizer on PATH, in \$CUDA_HOME/bin or /usr/local/cuda*/bin)"
  exit 3
fi
echo "sanitize: $SAN ($(timeout 10 "$SAN" --version 2>/dev/null | grep -m1 -i version || echo "version unknown")), limit ${T}s per run"

# name | tool | gpu_cases arguments
RUNS=("memcheck-0|memcheck|--backend all --shard 0/2" "memcheck-1|memcheck|--backend all --shard 1/2")
if [ "${SANITIZE_CSRC:-1}" != 0 ]; then
  RUNS+=("racecheck|racecheck|--backend cuda" "synccheck|synccheck|--backend cuda")
fi
pids=()
for r in "${RUNS[@]}"; do
  IFS='|' read -r name tool args <<< "$r"
  # shellcheck disable=SC2086  # the case arguments split on purpose
  timeout -s INT -k 5 "$T" "$SAN" --tool "$tool" --print-limit 20 \
    $PY -m bench.gpu_cases $args > "$LOG_DIR/sanitize-$name.log" 2>&1 &
  pids+=($!)
done

worst=0  # 0 ok, 4 incomplete, 3 unavailable (only when no run worked), 1 errors
n_unavailable=0
for i in "${!RUNS[@]}"; do
  IFS='|' read -r name tool args <<< "${RUNS[$i]}"
  wait "${pids[$i]}"
  rc=$?
  log="$LOG_DIR/sanitize-$name.log"
  errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$log" | tail -n 1 | grep -Eo '[0-9]+$')
  cases=$(grep -E '^gpu_cases: ' "$log" | tail -n 1)
  failed=$(echo "$cases" | grep -Eo '[0-9]+ failed' | grep -Eo '^[0-9]+')
  first=$(grep -m1 -E '^========= (Invalid|Race|Barrier|Error|ERROR|Uninitialized|Program hit|Warning)' "$log" | cut -c1-160)
  if [ -n "$errors" ] && [ "$errors" -gt 0 ]; then
    status=FAIL; detail="$errors errors; first: $first"; worst=1
  elif [ -n "$failed" ] && [ "$failed" -gt 0 ]; then
    status=FAIL; detail="$cases (failed under the tool)"; worst=1
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=TIMEOUT; detail="cut at ${T}s after $(grep -cE '^(ok|FAIL|SKIP) ' "$log") cases, no error reported so far"
    [ $worst = 1 ] || worst=4
  elif [ -n "$cases" ] && [ -n "$errors" ]; then
    if echo "$cases" | grep -q ' 0 ok, 0 failed'; then
      status=skipped; detail="nothing ran: $(grep -m1 '^SKIP' "$log" | cut -c1-120)"
      [ $worst = 1 ] || worst=4
    else
      status=ok; detail="0 errors; $cases"
    fi
  elif [ -z "$errors" ] || grep -qE '^========= (Error|Internal Sanitizer Error)|Sanitizer failed|not supported' "$log"; then
    # the tool did not get the program through: no driver support, a sandboxed runtime, ...
    status=unavailable; detail="$(grep -v '^\s*$' "$log" | tail -n 2 | tr '\n' ' ' | cut -c1-200)"
    n_unavailable=$((n_unavailable + 1))
  else
    status=FAIL; detail="the cases did not finish under the tool: $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-200)"
    worst=1
  fi
  echo "sanitize $name: $status $detail"
done
if [ $worst = 0 ] && [ $n_unavailable -gt 0 ]; then
  worst=$([ $n_unavailable = ${#RUNS[@]} ] && echo 3 || echo 4)
fi
case $worst in
  0) echo "sanitize: ok (every run clean)" ;;
  1) echo "sanitize: FAIL (errors reported; logs in $LOG_DIR/sanitize-*.log)" ;;
  3) echo "sanitize: unavailable (compute-sanitizer does not work here; not a failure of the code)" ;;
  4) echo "sanitize: incomplete (no errors found; a run was cut, skipped or could not run)" ;;
esac
exit $worst
