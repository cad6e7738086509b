#!/usr/bin/env bash
# bertcli against transformers on one GPU, in under 8 minutes: BERT-base pretraining at sequence 128
# and 512, bertcli with train.compile, and a MiniLM-shaped SST-2 fine-tuning epoch (bench/gpu_check.py
# says what each line measures). Run from the project's root; prints JSON lines and keeps them in
# $OUT/gpu_check.jsonl (OUT: the device tool's folder) or in a new temporary folder.
#   bash bench/gpu_check.sh                               # on a CUDA machine
#   GPU_CHECK_SST2=DIR bash bench/gpu_check.sh            # SST-2's train.tsv and dev.tsv from DIR
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh             # tiny shapes on the CPU: checks the script
set -u
RES=${OUT:-$(mktemp -d)}/gpu_check.jsonl
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
ARGS=()
[ "${GPU_CHECK_SMOKE:-0}" = 1 ] && ARGS+=(--smoke)
[ -n "${GPU_CHECK_SST2:-}" ] && ARGS+=(--sst2 "$GPU_CHECK_SST2")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
timeout 470 python3 bench/gpu_check.py "${ARGS[@]}" "$@" | tee "$RES"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo '{"what": "error", "error": "gpu_check.py ran past its 470 s"}' | tee -a "$RES"
echo "gpu_check: lines kept in $RES" >&2
exit "$status"
