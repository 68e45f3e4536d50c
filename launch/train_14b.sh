#!/usr/bin/env bash
# The upstream guide's 14B LoRA command, translated: context parallel 4 (Ulysses SP=4); the frozen base replicated
# where the memory plan fits it (trainer.ds_config=auto, the 14B default), else ZeRO-3 over all GPUs.
# Upstream runs it on 4 nodes x 8 GPUs; here it fits 4 GPUs (docs/performance.md). Several nodes: set HOSTFILE.
# Usage: bash launch/train_14b.sh SHARD_DIR [more dotted overrides...]   (NUM_GPUS=8, or HOSTFILE=launch/hostfile.example)
set -euo pipefail
SHARDS=${1:?give the shard folder built by python -m data_tools.build_shards}; shift
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
if [ -n "${HOSTFILE:-}" ]; then launcher=(deepspeed --hostfile "$HOSTFILE"); else launcher=(deepspeed --num_gpus "${NUM_GPUS:-8}"); fi
exec "${launcher[@]}" --module toolkit.train --experiment predict2_video2world_lora_training_14b_custom_data \
  model.config.train_architecture=lora dataloader_train.dataset.dataset_dir="$SHARDS" "$@"
