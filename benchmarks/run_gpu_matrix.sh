#!/usr/bin/env bash
# The GPU checks and benchmarks in one command; prints the table last (benchmarks/report.py) and regenerates
# docs/performance.md. Rows that need more GPUs than are present are skipped.
#
#   bash benchmarks/run_gpu_matrix.sh [OUTDIR=/tmp/gpu_out]
#   WHEELHOUSE=.whl bash benchmarks/run_gpu_matrix.sh      # air-gapped node: install the wheels first
#
# Checks inside: SP=2/4 first-step loss equals SP=1 (the `first loss` column), LoRA generation on 1 and 2 GPUs gives
# identical frames, the issue-2 forward+backward of the 2B at 720p. Each row has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
if [ -n "${WHEELHOUSE:-}" ]; then python3 -m pip install -q --no-index --no-deps "$WHEELHOUSE"/*.whl; fi
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
run() {  # run NEEDED_GPUS TIMEOUT command...
  local need=$1 limit=$2; shift 2
  if [ "$GPUS" -lt "$need" ]; then echo "=== skipped (needs $need GPUs): $*"; return; fi
  echo "=== $*"
  timeout "$limit" "$@" > "$OUT/last.log" 2>&1; local status=$?
  grep -E "RESULT|wrote|timings" "$OUT/last.log" | tail -4
  [ $status -eq 0 ] || { echo "FAILED ($status): $*"; grep -vE "Warning|return func|^\s*$" "$OUT/last.log" | tail -8; }
  cat "$OUT/last.log" >> "$OUT/all.log"
}
TR="python3 -m torch.distributed.run --standalone"
TT="-m benchmarks.train_throughput --warmup 1"
one() { env CUDA_VISIBLE_DEVICES=0 "$@"; }
# 1 GPU: issue-2 forward+backward, our LoRA step, the hand-built diffusers baseline, 480p rows, generation.
# 2B rows named without a tag use ds_configs/2b.json (ZeRO-3); `replicated_base` rows the 2B default JSON (ZeRO-2).
run 1 150 one python3 $TT --mode fwdbwd --size 2B --resolution 720 --checkpointing selective --steps 1
run 1 180 one python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 --ds_config ds_configs/2b.json
run 1 150 one python3 $TT --mode diffusers --size 2B --resolution 720 --steps 1
run 1 120 one python3 $TT --size 2B --resolution 480 --checkpointing selective --steps 3 --ds_config ds_configs/2b.json
run 1 200 one python3 $TT --size 14B --resolution 480 --checkpointing full --steps 2
run 1 150 one python3 -m benchmarks.generate_throughput --size 2B --resolution 720 --measured_steps 2
run 1 60 one python3 -m benchmarks.generate_throughput --size 2B --resolution 480 --measured_steps 2
run 1 170 one python3 -m benchmarks.generate_throughput --size 14B --resolution 720 --measured_steps 1
# 2 and 4 GPUs: Ulysses scaling (first loss must equal the SP=1 row), 14B at 720p, generation with SP=2
run 2 150 $TR --nproc_per_node=2 $TT --size 2B --resolution 720 --sp 2 --steps 3 --ds_config ds_configs/2b.json
run 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing selective --steps 3 --ds_config ds_configs/2b.json
run 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing auto --steps 3 --ds_config ds_configs/2b.json
run 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing auto --steps 3 --ds_config ds_configs/2b_replicated_base.json --tag replicated_base
run 1 130 one python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 --ds_config ds_configs/2b_replicated_base.json --tag replicated_base
run 2 100 $TR --nproc_per_node=2 $TT --size 2B --resolution 720 --sp 2 --checkpointing selective --steps 3 --ds_config ds_configs/2b_replicated_base.json --tag replicated_base
run 4 170 $TR --nproc_per_node=4 $TT --size 14B --resolution 720 --sp 4 --checkpointing selective --steps 2 --ds_config ds_configs/14b_replicated_base.json --tag replicated_base
run 4 240 $TR --nproc_per_node=4 $TT --size 14B --resolution 720 --sp 4 --checkpointing selective --steps 2
run 2 120 $TR --nproc_per_node=2 -m benchmarks.generate_throughput --size 2B --resolution 720 --sp 2 --measured_steps 2
# LoRA generation on 1 and 2 GPUs: identical frames
python3 -m benchmarks.make_random_adapter --size 2B --rank 16 --output "$OUT/adapter_2b" > /dev/null
python3 -c "from PIL import Image; import numpy as np; Image.fromarray((np.random.default_rng(0).random((720,1280,3))*255).astype('uint8')).save('$OUT/input.png')"
GEN=(-m toolkit.generate --model_size 2B --dit_path random --vae tiny --t5 tiny --input_path "$OUT/input.png" --prompt "a robot arm" --num_steps 4 --lora "$OUT/adapter_2b" --benchmark)
run 1 150 one python3 "${GEN[@]}" --save_path "$OUT/lora_1gpu.mp4"
run 2 150 $TR --nproc_per_node=2 "${GEN[@]}" --num_gpus 2 --save_path "$OUT/lora_2gpu.mp4"
[ -f "$OUT/lora_2gpu.mp4" ] && python3 - "$OUT" <<'PY'
import sys, numpy as np
from toolkit.data.video import decode_frames, probe_video
a, b = (decode_frames(p, 0, probe_video(p).num_frames).astype(float) for p in (f"{sys.argv[1]}/lora_{n}gpu.mp4" for n in (1, 2)))
print(f"RESULT LoRA generation, 1 vs 2 GPUs: {a.shape[0]} frames, mean |diff| {np.abs(a - b).mean():.3f}, max {np.abs(a - b).max():.0f} (uint8 levels)")
PY
python3 -m benchmarks.report
