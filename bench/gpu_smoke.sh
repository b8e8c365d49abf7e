#!/usr/bin/env bash
# The GPU path end to end on a tiny model, through the installed command: qrun submit (w4, w8, and a
# baseline perplexity eval), qrun run --until-empty on the GPU worker, then status and workers.
# On the device:  source bench/device_env.sh && bash bench/gpu_smoke.sh   (results under $OUT)
set -u
out=${OUT:-/tmp/gpu-smoke}; mkdir -p "$out"
export QRUN_HOME=$(mktemp -d) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
qrun() { python3 -m qrun.cli.main "$@"; }
python3 - "$QRUN_HOME/tiny" <<'PY'
import sys
from pathlib import Path
from qrun.demo.tiny import build_tiny_model, sample_texts
build_tiny_model(Path(sys.argv[1]), arch="qwen2", hidden=256, intermediate=512, layers=4)
open(sys.argv[1] + ".txt", "w").write("\n\n".join(sample_texts()))
PY
qrun submit --model "$QRUN_HOME/tiny" --bits 4 --bits 8 --group-size 64 --calib-samples 16
qrun eval --model "$QRUN_HOME/tiny" --ppl "$QRUN_HOME/tiny.txt"
SECONDS=0
qrun run --until-empty 2>&1 | tee "$out/run.log"
echo "run wall s: $SECONDS" | tee -a "$out/run.log"
qrun status --all --json > "$out/status.json"
qrun status --all --wide | tee "$out/status.txt"
qrun workers --all | tee "$out/workers.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
