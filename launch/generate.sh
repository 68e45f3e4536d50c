#!/usr/bin/env bash
# Generate with a trained adapter on N GPUs (Ulysses sequence parallelism; rank 0 writes the video).
# Usage: NUM_GPUS=2 bash launch/generate.sh RUN_DIR_OR_ADAPTER INPUT_IMAGE_OR_CLIP "PROMPT" OUTPUT.mp4 [more flags]
set -euo pipefail
ADAPTER=${1:?adapter (run folder, export folder or file)}; INPUT=${2:?image or clip}; PROMPT=${3:?prompt}; OUTPUT=${4:?output mp4}
shift 4
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
N=${NUM_GPUS:-1}
if [ "$N" -gt 1 ]; then launcher=(torchrun --standalone --nproc_per_node="$N"); else launcher=(python); fi
exec "${launcher[@]}" -m toolkit.generate --num_gpus "$N" --model_size "${MODEL_SIZE:-2B}" --lora "$ADAPTER" \
  --input_path "$INPUT" --prompt "$PROMPT" --save_path "$OUTPUT" "$@"
