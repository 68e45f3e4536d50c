#!/usr/bin/env bash
# The upstream guide's 2B LoRA command, translated: 8 GPUs of one node, context parallel 2 (Ulysses SP=2).
#   upstream: torchrun --nproc_per_node=8 --master_port=12341 -m scripts.train --config=... -- \
#             experiment=predict2_video2world_lora_training_2b_custom_data model.config.train_architecture=lora
# Usage: bash launch/train_2b.sh SHARD_DIR [more dotted overrides...]   (NUM_GPUS=8 by default)
set -euo pipefail
SHARDS=${1:?give the shard folder built by python -m data_tools.build_shards}; shift
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec deepspeed --num_gpus "${NUM_GPUS:-8}" --module toolkit.train \
  --experiment predict2_video2world_lora_training_2b_custom_data \
  model.config.train_architecture=lora dataloader_train.dataset.dataset_dir="$SHARDS" "$@"
