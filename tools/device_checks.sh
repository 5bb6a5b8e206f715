#!/usr/bin/env bash
# The GPU checks as one command, on a machine without network (see docs/gpu.md).
#
#   tools/device_checks.sh STEP [STEP ...]
#
# Run on the device machine from the repo root, with `.device-data` carried (tools/stage_device_data.py).
# Steps: cuda-tests | bench:NAME | run:NAME (full profile, 4 runs side by side on the one GPU, bf16).
# Everything lands in $OUT as at most 8 flat files: log.txt, and per run NAME-table.md + NAME-results.jsonl.
set -uo pipefail
OUT="${OUT:-/tmp/device-out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TRANSFERLAB_DATA="$PWD/.device-data" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}" PROFILE="${PROFILE:-full}"  # DEVICE=cpu PROFILE=quick: a dry run anywhere
LOG="$OUT/log.txt"
[ -f .device-data/wordnet.tar.xz ] && [ ! -d .device-data/wordnet ] && tar -xJf .device-data/wordnet.tar.xz -C .device-data
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >>"$LOG" 2>&1
for step in "$@"; do
  echo "=== $step ($(date -u +%H:%M:%S))" >>"$LOG"
  t0=$(date +%s)
  rc=0
  case "$step" in
    cuda-tests) "$PY" -m pytest -q -m cuda -p no:cacheprovider tests >>"$LOG" 2>&1 || rc=$? ;;
    bench:*) "$PY" -m transferlab bench "${step#bench:}" --device "$DEVICE" >>"$LOG" 2>&1 || rc=$? ;;
    run:*)
      name="${step#run:}"
      mp=bf16; [ "$DEVICE" = cpu ] && mp=no
      "$PY" -m transferlab run "$name" --profile "$PROFILE" --jobs 4 --device "$DEVICE" --mixed-precision "$mp" \
        --out /tmp/device-results >>"$LOG" 2>&1 || rc=$?
      cp /tmp/device-results/"$name"/table.md "$OUT/$name-table.md" 2>/dev/null
      cp /tmp/device-results/"$name"/results.jsonl "$OUT/$name-results.jsonl" 2>/dev/null
      tail -n 30 /tmp/device-results/"$name"/job-*.log >>"$LOG" 2>/dev/null ;;
    *) echo "unknown step $step (cuda-tests | bench:NAME | run:NAME)" >>"$LOG"; rc=2 ;;
  esac
  echo "=== $step exit $rc after $(( $(date +%s) - t0 )) s" >>"$LOG"
done
tail -n 60 "$LOG"
