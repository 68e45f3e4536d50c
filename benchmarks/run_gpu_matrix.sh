#!/usr/bin/env bash
# The GPU checks and benchmarks in one command; prints the table last (benchmarks/report.py) and regenerates
# docs/performance.md. Rows that need more GPUs than are present are skipped.
#
#   bash benchmarks/run_gpu_matrix.sh [OUTDIR=/tmp/gpu_out]
#   WHEELHOUSE=.whl bash benchmarks/run_gpu_matrix.sh      # air-gapped node: install the wheels first
#   SETS="compile rows2b" bash benchmarks/run_gpu_matrix.sh # only some sets: compile attention generate generate14b rows2b
#                                                           # gen14b rows14b more14b zero3 lora_generate, and with
#                                                           # FlashAttention-4 installed fa4train fa4train14b;
#                                                           # sp480 (the Ulysses exchange), lorafuse (LoRA forward),
#                                                           # host (the host's cost per block, eager vs compiled);
#                                                           # blockc, blockc14, blockc2 (compile=block on 4 / 2
#                                                           # GPUs; only when named); scale14 (the 14B from
#                                                           # one GPU to SP=4 at 480p; only when named);
#                                                           # scale14_720, zero3_480 (the 14B at 720p from SP=2
#                                                           # to 4; ZeRO-3 at 480p SP=4; only when named);
#                                                           # scale720 (2B and 14B at 720p from one GPU
#                                                           # to SP=8, side by side where GPUs allow;
#                                                           # zero3_8: the 14B on 8 GPUs, ZeRO-3 and defaults);
#                                                           # zero3_ab (replicated base vs ZeRO-3, 14B SP=4);
#                                                           # cli (the training command, 14B defaults, 1 GPU;
#                                                           # E2E_SHARDS=latent shards at 480p)
#                                                           # fullblock, fulltags (full recompute under block
#                                                           # compile; its recompute tags against plain ones)
#                                                           # MIN_GPUS=2 skips 1-GPU rows
#
# Checks inside: SP=2/4 first-step loss equals SP=1 (the `first loss` column), LoRA generation on 1 and 2 GPUs gives
# identical frames, the issue-2 forward+backward of the 2B at 720p. Each row has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_out}; mkdir -p "$OUT"; touch "$OUT/.start"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
if [ -n "${WHEELHOUSE:-}" ]; then python3 -m pip install -q --no-index --no-deps "$WHEELHOUSE"/*.whl; fi
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
SETS=${SETS:-all}   # e.g. SETS="compile rows2b" runs only those sets (each fits a 10-minute slot on 4 H100s)
NAMED_ONLY=" cli blockc blockc14 blockc2 scale14 scale14_720 zero3_480 zero3_ab scale720 zero3_8 fullblock fulltags "   # comparisons, not in `all`
selected() {  # selected SET: whether SETS asks for it
  if [ "$SETS" = all ]; then [[ "$NAMED_ONLY" != *" $1 "* ]]; else [[ " $SETS " == *" $1 "* ]]; fi
}
run() {  # run SET NEEDED_GPUS TIMEOUT command...
  local set=$1 need=$2 limit=$3; shift 3
  selected "$set" || return
  if [ "$GPUS" -lt "$need" ]; then echo "=== skipped (needs $need GPUs): $*"; return; fi
  if [ "$need" -lt "${MIN_GPUS:-1}" ]; then return; fi
  echo "=== [$set] $*"
  timeout "$limit" "$@" > "$OUT/last.log" 2>&1; local status=$?
  grep -E "RESULT|wrote|timings" "$OUT/last.log" | tail -4
  [ $status -eq 0 ] || { echo "FAILED ($status): $*"; grep -vE "Warning|return func|^\s*$" "$OUT/last.log" | tail -8; }
  cat "$OUT/last.log" >> "$OUT/all.log"
}
runbg() {  # runbg SET NEEDED_GPUS TIMEOUT NAME command...: like run, in the background with its own log; then `finish`
  local set=$1 need=$2 limit=$3 name=$4; shift 4
  selected "$set" || return
  if [ "$GPUS" -lt "$need" ] || [ "$need" -lt "${MIN_GPUS:-1}" ]; then echo "=== skipped: $*"; return; fi
  echo "=== [$set, in the background: $name] $*"
  ( timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; status=$?
    { grep -E "RESULT|wrote|timings" "$OUT/$name.log" | tail -4
      [ $status -eq 0 ] || { echo "FAILED ($status): $*"; grep -vE "Warning|return func|^\s*$" "$OUT/$name.log" | tail -8; }
    } > "$OUT/$name.summary" ) &
  BACKGROUND="${BACKGROUND:-} $name"
}
finish() {  # wait for the background rows and print their summaries
  wait
  for name in ${BACKGROUND:-}; do echo "--- $name"; cat "$OUT/$name.summary"; cat "$OUT/$name.log" >> "$OUT/all.log"; done
  BACKGROUND=""
}
TR="python3 -m torch.distributed.run --standalone"
TT="-m benchmarks.train_throughput --warmup 1"
GT="-m benchmarks.generate_throughput"
ONE="env CUDA_VISIBLE_DEVICES=0"   # a command, not a function: `timeout` runs it
R2B="--ds_config ds_configs/2b_replicated_base.json --tag replicated_base"   # the 2B default JSON (ZeRO-2)
Z2B="--ds_config ds_configs/2b.json"                                          # ZeRO-3 comparison rows
Z14="--ds_config ds_configs/14b.json"   # the 14B's ZeRO-3 rows (its default, `auto`, picks the replicated base where it fits)
# compile: the default torch.compile (`auto`: whole blocks with the replicated base) against eager on the same
# machine (tag eager = compile none), with the
# profiler's host-sync check on the 1-GPU row, and the hand-built diffusers + PEFT baseline in the same run.
run compile 1 200 $ONE python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $R2B --profile
run compile 1 150 $ONE python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $R2B --compile none --tag replicated_base_eager
run compile 2 120 $TR --nproc_per_node=2 $TT --size 2B --resolution 720 --sp 2 --checkpointing auto --steps 3 $R2B
run compile 2 120 $TR --nproc_per_node=2 $TT --size 2B --resolution 720 --sp 2 --checkpointing auto --steps 3 $R2B --compile none --tag replicated_base_eager
run compile 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing auto --steps 3 $R2B
run compile 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing auto --steps 3 $R2B --compile none --tag replicated_base_eager
run compile 1 150 $ONE python3 $GT --size 2B --resolution 720 --measured_steps 2 --compile none --tag eager --attention_backend cudnn
# generate: one whole 2B video per resolution through the pipeline, timed end to end, with the VAE before/after
# (conditioning frames only) and a profiled guided step, with PyTorch's cuDNN attention and, where FlashAttention-4
# is installed, with it (what `auto` then picks); generate14b: the 14B on one GPU; attention: the kernels alone
FA4=$(python3 -c "from toolkit.model.attention import fa4_installed; print(int(fa4_installed()))" 2>/dev/null || echo 0)
CU="--attention_backend cudnn"
run attention 1 300 $ONE python3 -m benchmarks.attention_kernels
run generate 1 420 $ONE python3 $GT --size 2B --resolution 720 --measured_steps 2 --full_video --profile $CU
run generate 1 150 $ONE python3 $GT --size 2B --resolution 480 --measured_steps 2 --full_video $CU
run generate14b 1 150 $ONE python3 $GT --size 14B --resolution 480 --measured_steps 1 $CU
run generate14b 1 200 $ONE python3 $GT --size 14B --resolution 720 --measured_steps 1 $CU
if [ "$FA4" = 1 ]; then
  # fa4train: training through FA4's custom ops against cuDNN on the same machine (losses, speed, memory), and what
  # `auto` picks. With 4 GPUs the kernel check and the three 1-GPU rows run side by side, one GPU each; then the
  # SP=4 rows in turn, the 2B 480p one profiled (its scaling is the lowest).
  KC="-m benchmarks.attention_kernels --only 2B_720p,2B_720p_cross,14B_720p,check,check_cross --kernels cudnn,fa4,fa4_op --tag fa4op"
  F4="--attention_backend fa4"; A4="--attention_backend cudnn"
  if [ "$GPUS" -ge 4 ]; then
    runbg fa4train 4 300 kernels env CUDA_VISIBLE_DEVICES=2 python3 $KC
    runbg fa4train 4 300 one_auto env CUDA_VISIBLE_DEVICES=3 python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $R2B --attention_backend auto --tag replicated_base_auto
    runbg fa4train 4 300 one_fa4 env CUDA_VISIBLE_DEVICES=0 python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $R2B $F4 --tag replicated_base_fa4
    runbg fa4train 4 300 one_cudnn env CUDA_VISIBLE_DEVICES=1 python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $R2B $A4 --tag replicated_base_ab_cudnn
    finish
  else
    run fa4train 1 300 $ONE python3 $KC
    run fa4train 1 300 $ONE python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $R2B $F4 --tag replicated_base_fa4
    run fa4train 1 300 $ONE python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $R2B $A4 --tag replicated_base_ab_cudnn
  fi
  run fa4train 4 200 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing auto --steps 3 $R2B $F4 --tag replicated_base_fa4
  run fa4train 4 200 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing auto --steps 3 $R2B $A4 --tag replicated_base_ab_cudnn
  run fa4train 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 480 --sp 4 --checkpointing auto --steps 3 $R2B $F4 --tag replicated_base_fa4 --profile
  run fa4train14b 4 240 $TR --nproc_per_node=4 $TT --size 14B --resolution 720 --sp 4 --checkpointing selective --steps 2 --ds_config ds_configs/14b_replicated_base.json $F4 --tag replicated_base_fa4
  run generate 1 400 $ONE python3 $GT --size 2B --resolution 720 --measured_steps 1 --full_video --attention_backend fa4 --tag fa4
  run generate 1 100 $ONE python3 $GT --size 2B --resolution 480 --measured_steps 2 --full_video --attention_backend fa4 --tag fa4
  run generate14b 1 200 $ONE python3 $GT --size 14B --resolution 720 --measured_steps 1 --attention_backend fa4 --tag fa4
else
  echo "=== FlashAttention-4 not installed: its generation rows are skipped (pip install -e '.[fa4]')"
fi
# sp480: what limits the 2B at 480p and SP=4, and the two changes against it (model_parallel.ulysses_exchange=fused,
# model.config.fuse_lora), with the kernel `auto` picks (FA4 where installed). The exchange alone on 4 and 2 GPUs;
# then the SP=4 and SP=2 rows with the defaults, each also run behind a queued GPU sleep (--host_lead_ms: the GPU's own
# step time) and alternating step by step with the step as it was before both changes (--alternate).
# lorafuse: the 1-GPU rows side by side, one GPU each: 720p and 480p with the fused LoRA forward and with PEFT's.
AB=$([ "${FA4:-0}" = 1 ] && echo fa4 || echo cudnn)
S2B="--size 2B --ds_config ds_configs/2b_replicated_base.json --attention_backend $AB"
run sp480 4 120 $TR --nproc_per_node=4 -m benchmarks.sequence_exchange
run sp480 2 120 env CUDA_VISIBLE_DEVICES=0,1 $TR --nproc_per_node=2 -m benchmarks.sequence_exchange
run sp480 4 200 $TR --nproc_per_node=4 $TT $S2B --resolution 480 --sp 4 --checkpointing auto --steps 8 --host_lead_ms 1200 --alternate --tag replicated_base_${AB}
run sp480 2 200 env CUDA_VISIBLE_DEVICES=0,1 $TR --nproc_per_node=2 $TT $S2B --resolution 480 --sp 2 --checkpointing auto --steps 5 --alternate --tag replicated_base_${AB}
run sp480 4 200 $TR --nproc_per_node=4 $TT $S2B --resolution 720 --sp 4 --checkpointing auto --steps 4 --host_lead_ms 2000 --alternate --tag replicated_base_${AB}
if [ "$GPUS" -ge 4 ]; then
  runbg lorafuse 4 300 f720 env CUDA_VISIBLE_DEVICES=0 python3 $TT $S2B --checkpointing selective --resolution 720 --steps 3 --tag replicated_base_${AB}
  runbg lorafuse 4 300 p720 env CUDA_VISIBLE_DEVICES=1 python3 $TT $S2B --checkpointing selective --resolution 720 --steps 3 --fuse_lora false --tag replicated_base_${AB}_peft
  runbg lorafuse 4 300 f480 env CUDA_VISIBLE_DEVICES=2 python3 $TT $S2B --checkpointing selective --resolution 480 --steps 5 --tag replicated_base_${AB}
  runbg lorafuse 4 300 p480 env CUDA_VISIBLE_DEVICES=3 python3 $TT $S2B --checkpointing selective --resolution 480 --steps 5 --fuse_lora false --tag replicated_base_${AB}_peft
  finish
fi
# host: the host's cost per block by compile mode (benchmarks.host_overhead on the GPU's host), then the 2B at 480p
# and SP=4 eager against compiled elementwise maths in two rounds, since its steps drift from run to run (the
# default, block, against elementwise: set blockc).
run host 1 200 $ONE python3 -m benchmarks.host_overhead --device cuda
for round in 1 2; do
  run host 4 200 $TR --nproc_per_node=4 $TT $S2B --resolution 480 --sp 4 --checkpointing auto --steps 8 --host_lead_ms 1200 --compile none --tag replicated_base_${AB}_eager_$round
  run host 4 200 $TR --nproc_per_node=4 $TT $S2B --resolution 480 --sp 4 --checkpointing auto --steps 8 --host_lead_ms 1200 --compile elementwise --tag replicated_base_${AB}_elementwise_$round
done
# blockc: model.config.compile=block (each whole block through torch.compile; the training default) against elementwise:
# on 4 GPUs the 1-GPU pairs at 720p and 480p side by side (one GPU each), then 2B 480p SP=4 in rounds (its steps
# drift from run to run; BLOCK_ROUNDS="1 2" by default). blockc14: 2B 720p SP=4 and the 14B 720p SP=4 (replicated
# base) under block. Not in `all`: name them.
if selected blockc; then
  if [ "$GPUS" -ge 4 ] && [ "${BLOCK_PAIRS:-1}" = 1 ]; then   # BLOCK_PAIRS=0: only the SP=4 rounds
    for mode in block elementwise; do
      gpu=$([ $mode = block ] && echo 0 || echo 1)
      runbg blockc 4 400 ${mode}720 env CUDA_VISIBLE_DEVICES=$gpu python3 $TT $S2B --checkpointing selective --resolution 720 --steps 3 --compile $mode --tag replicated_base_${AB}_$mode
      runbg blockc 4 400 ${mode}480 env CUDA_VISIBLE_DEVICES=$((gpu + 2)) python3 $TT $S2B --checkpointing selective --resolution 480 --steps 5 --compile $mode --tag replicated_base_${AB}_$mode
    done
    finish
  fi
  for round in ${BLOCK_ROUNDS:-1 2}; do
    run blockc 4 200 $TR --nproc_per_node=4 $TT $S2B --resolution 480 --sp 4 --checkpointing auto --steps 8 --host_lead_ms 1200 --compile block --tag replicated_base_${AB}_block_$round
    run blockc 4 200 $TR --nproc_per_node=4 $TT $S2B --resolution 480 --sp 4 --checkpointing auto --steps 8 --host_lead_ms 1200 --compile elementwise --tag replicated_base_${AB}_elementwise_$round
  done
fi
for mode in ${BLOCK14_MODES:-block}; do   # BLOCK14_MODES="block elementwise": the 2B row's elementwise twin too
  run blockc14 4 200 $TR --nproc_per_node=4 $TT $S2B --resolution 720 --sp 4 --checkpointing auto --steps 3 --compile $mode --tag replicated_base_${AB}_$mode
done
run blockc14 4 330 $TR --nproc_per_node=4 $TT --size 14B --resolution 720 --sp 4 --checkpointing selective --steps 2 --ds_config ds_configs/14b_replicated_base.json --attention_backend $AB --compile block --tag replicated_base_${AB}_block
# scale14: Ulysses scaling of the 14B from one GPU at 480p: with the replicated base (selective, cuDNN, elementwise)
# on 1 GPU and at SP=4, the SP=4 row with ZeRO-3 (14b.json) beside it, and the SP=4 row with the defaults (FA4 where
# installed, block compile). Not in `all`: name it.
S14R="--size 14B --resolution 480 --checkpointing selective --steps 3 --ds_config ds_configs/14b_replicated_base.json"
run scale14 4 240 $ONE python3 $TT $S14R --attention_backend cudnn --compile elementwise --tag replicated_base
run scale14 4 240 $TR --nproc_per_node=4 $TT $S14R --sp 4 --attention_backend cudnn --compile elementwise --tag replicated_base
run scale14 4 300 $TR --nproc_per_node=4 $TT --size 14B --resolution 480 --sp 4 --checkpointing selective --steps 3 --ds_config ds_configs/14b.json --attention_backend cudnn --compile elementwise
run scale14 4 240 $TR --nproc_per_node=4 $TT --size 14B --resolution 480 --sp 4 --checkpointing auto --steps 3 --ds_config ds_configs/14b_replicated_base.json --tag replicated_base_$AB
# scale14_720: the 14B at 720p from SP=2 (the fewest H100s its replicated base fits: full recompute, plan 53 GiB) to
# SP=4 with the same JSON, policy and kernels (FA4 where installed, block compile). zero3_480: the 14B at 480p, SP=4,
# under ZeRO-3 (14b.json) after two warm-up steps and profiled, then with prefetch over two blocks and three live.
# Not in `all`: name them.
S14F="--size 14B --resolution 720 --checkpointing full --steps 2 --ds_config ds_configs/14b_replicated_base.json --attention_backend $AB"
run scale14_720 2 360 env CUDA_VISIBLE_DEVICES=0,1 $TR --nproc_per_node=2 $TT $S14F --sp 2 --tag replicated_base_${AB}_full
run scale14_720 4 240 $TR --nproc_per_node=4 $TT $S14F --sp 4 --tag replicated_base_${AB}_full
if selected zero3_480; then
  python3 -c "import json; c = json.load(open('ds_configs/14b.json')); z = c['zero_optimization']
z.update(stage3_prefetch_bucket_size=800000000, stage3_max_live_parameters=3000000000); json.dump(c, open('$OUT/14b_prefetch2.json', 'w'))"
  S14Z="--size 14B --resolution 480 --sp 4 --checkpointing selective --warmup 2 --steps 4 --attention_backend cudnn --compile elementwise"
  run zero3_480 4 300 $TR --nproc_per_node=4 $TT $S14Z --ds_config ds_configs/14b.json --profile --tag steady
  run zero3_480 4 300 $TR --nproc_per_node=4 $TT $S14Z --ds_config "$OUT/14b_prefetch2.json" --tag prefetch2
fi
# zero3_ab: the replicated base against ZeRO-3 for the 14B at SP=4, same flags otherwise: 480p beside zero3_480's
# steady row (the replicated twin), and 720p full recompute under ZeRO-3 with its default compile (elementwise) beside
# scale720's replicated SP=4 row. Named only.
run zero3_ab 4 300 $TR --nproc_per_node=4 $TT --size 14B --resolution 480 --sp 4 --checkpointing selective --warmup 2 --steps 4 --attention_backend cudnn --compile elementwise --ds_config ds_configs/14b_replicated_base.json --tag replicated_base_steady
run zero3_ab 4 330 $TR --nproc_per_node=4 $TT --size 14B --resolution 720 --sp 4 --checkpointing full --warmup 2 --steps 2 --attention_backend cudnn --ds_config ds_configs/14b.json --tag full
# scale720: Ulysses scaling at 720p from one GPU on one machine, for cards with room for the 14B on one GPU (H200:
# the replicated base with full recompute, plan 84 GiB): per size in SCALE_SIZES (default "2B 14B"), the GPU counts in
# SCALE_GPUS (default 1 2 4 8, those present) run side by side on disjoint GPUs while they fit (1, 2 and 4 at once on
# 8 GPUs; 1 and 2 on 4), then the rest. The 2B with the defaults (selective on one GPU, `auto` above); the 14B with
# full recompute everywhere. zero3_8: the 14B at 720p on 8 GPUs under ZeRO-3 and with the defaults (`auto`
# checkpointing and trainer.ds_config). Named only.
scale_rows() {  # scale_rows SIZE: one row per GPU count, packed onto disjoint GPUs
  local size=$1 offset=0 n gpus args limit
  for n in ${SCALE_GPUS:-1 2 4 8}; do
    [ "$n" -le "$GPUS" ] || continue
    offset=$(( (offset + n - 1) / n * n ))
    if [ $((offset + n)) -gt "$GPUS" ]; then finish; offset=0; fi
    gpus=$(seq -s, "$offset" $((offset + n - 1)))
    if [ "$size" = 2B ]; then
      args="$S2B --resolution 720 --checkpointing auto --steps 3 --tag replicated_base_${AB}_scale"; limit=360
    else
      args="$S14F --tag replicated_base_${AB}_full_scale"; limit=480
    fi
    if [ "$n" = 1 ]; then
      runbg scale720 1 "$limit" "s${size}_$n" env CUDA_VISIBLE_DEVICES=$gpus python3 $TT $args
    else
      runbg scale720 "$n" "$limit" "s${size}_$n" env CUDA_VISIBLE_DEVICES=$gpus $TR --nproc_per_node=$n $TT $args --sp $n
    fi
    offset=$((offset + n))
  done
  finish
}
if selected scale720; then
  for size in ${SCALE_SIZES:-2B 14B}; do scale_rows "$size"; done
fi
run zero3_8 8 420 $TR --nproc_per_node=8 $TT --size 14B --resolution 720 --sp 8 --checkpointing auto --steps 2 --warmup 2 --attention_backend $AB --ds_config ds_configs/14b.json
run zero3_8 8 300 $TR --nproc_per_node=8 $TT --size 14B --resolution 720 --sp 8 --checkpointing auto --steps 2 --attention_backend $AB --tag defaults
# fullblock: full recompute under whole-block compile against elementwise, the 2B at 480p: four 1-GPU rows at once
# (block and elementwise with FA4, block with cuDNN, selective block), then SP=4 block and elementwise. Named only.
if selected fullblock; then
  S2F="--size 2B --ds_config ds_configs/2b_replicated_base.json --resolution 480 --steps 3"
  if [ "${FULLBLOCK_PAIRS:-1}" = 1 ]; then   # FULLBLOCK_PAIRS=0: only the SP=4 rows
  runbg fullblock 4 300 fb0 env CUDA_VISIBLE_DEVICES=0 python3 $TT $S2F --checkpointing full --attention_backend $AB --compile block --tag replicated_base_${AB}_block
  runbg fullblock 4 300 fe1 env CUDA_VISIBLE_DEVICES=1 python3 $TT $S2F --checkpointing full --attention_backend $AB --compile elementwise --tag replicated_base_${AB}_elementwise
  runbg fullblock 4 300 fc2 env CUDA_VISIBLE_DEVICES=2 python3 $TT $S2F --checkpointing full --attention_backend cudnn --compile block --tag replicated_base_cudnn_block
  runbg fullblock 4 300 sb3 env CUDA_VISIBLE_DEVICES=3 python3 $TT $S2F --checkpointing selective --attention_backend $AB --compile block --tag replicated_base_${AB}_block_fullset
  finish
  fi
  for mode in ${FULLBLOCK_MODES:-block elementwise}; do
    run fullblock 4 200 $TR --nproc_per_node=4 $TT $S2F --sp 4 --checkpointing full --attention_backend $AB --compile $mode --tag replicated_base_${AB}_$mode
  done
fi
# fulltags: full recompute under block compile, every op tagged prefer-recompute (the toolkit's) against plain
# checkpoint's tags (before: torch 2.11 keeps the all-to-all outputs), same machine: 14B 720p and 2B 480p at SP=4. Named only.
for tags in plain recompute; do
  run fulltags 4 240 $TR --nproc_per_node=4 $TT $S14F --sp 4 --full_tags $tags --tag replicated_base_${AB}_full_tags_$tags
  run fulltags 4 150 $TR --nproc_per_node=4 $TT --size 2B --ds_config ds_configs/2b_replicated_base.json --resolution 480 --steps 3 --sp 4 --checkpointing full --attention_backend $AB --compile block --full_tags $tags --tag replicated_base_${AB}_block_tags_$tags
done
# blockc2: the same comparison where two GPUs are lent: 2B 480p SP=2, block against elementwise in two rounds, each
# behind a queued GPU sleep (the GPU's own s/it next to the host-bound one). Not in `all`: name it.
if selected blockc2; then
  for round in 1 2; do
    run blockc2 2 220 env CUDA_VISIBLE_DEVICES=0,1 $TR --nproc_per_node=2 $TT $S2B --resolution 480 --sp 2 --checkpointing auto --steps 6 --host_lead_ms 2000 --compile block --tag replicated_base_${AB}_block_$round
    run blockc2 2 220 env CUDA_VISIBLE_DEVICES=0,1 $TR --nproc_per_node=2 $TT $S2B --resolution 480 --sp 2 --checkpointing auto --steps 6 --host_lead_ms 2000 --compile elementwise --tag replicated_base_${AB}_elementwise_$round
  done
fi
# rows2b: 2B at 480p and 720p on 1, 2, 4 GPUs (default JSON); a whole 720p video on 2 GPUs
run compile 1 150 $ONE python3 $TT --mode diffusers --size 2B --resolution 720 --steps 1
run rows2b 1 120 $ONE python3 $TT --size 2B --resolution 480 --checkpointing auto --steps 3 $R2B
run rows2b 2 120 $TR --nproc_per_node=2 $TT --size 2B --resolution 480 --sp 2 --checkpointing auto --steps 3 $R2B
run rows2b 4 120 $TR --nproc_per_node=4 $TT --size 2B --resolution 480 --sp 4 --checkpointing auto --steps 3 $R2B
run rows2b 4 120 $TR --nproc_per_node=4 $TT --size 2B --resolution 480 --sp 1 --checkpointing auto --steps 3 $R2B --tag replicated_base_dp
run rows2b 2 240 $TR --nproc_per_node=2 $GT --size 2B --resolution 720 --sp 2 --measured_steps 2 --full_video --attention_backend cudnn
# zero3: the 2B under ZeRO-3 (ds_configs/2b.json) for comparison, and the issue-2 forward+backward
run zero3 1 150 $ONE python3 $TT --mode fwdbwd --size 2B --resolution 720 --checkpointing selective --steps 1
run zero3 1 180 $ONE python3 $TT --size 2B --resolution 720 --checkpointing selective --steps 3 $Z2B
run zero3 1 120 $ONE python3 $TT --size 2B --resolution 480 --checkpointing selective --steps 3 $Z2B
run zero3 2 150 $TR --nproc_per_node=2 $TT --size 2B --resolution 720 --sp 2 --steps 3 $Z2B
run zero3 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing selective --steps 3 $Z2B
run zero3 4 150 $TR --nproc_per_node=4 $TT --size 2B --resolution 720 --sp 4 --checkpointing auto --steps 3 $Z2B
# rows14b: the 14B at 720p on 4 GPUs (replicated base) and 2 GPUs (ZeRO-3), at 480p on 2 and 4 GPUs;
# more14b: 720p on 4 GPUs under ZeRO-3, 480p on 1 GPU, and 720p on 1 GPU with the base offloaded. ZeRO-3 rows warm up 2 steps: DeepSpeed records its
# parameter trace in the first steps (measured: 15.96 s then 7.28 s for the 14B 480p at SP=2).
run rows14b 4 170 $TR --nproc_per_node=4 $TT --size 14B --resolution 720 --sp 4 --checkpointing selective --steps 2 --ds_config ds_configs/14b_replicated_base.json --tag replicated_base
run rows14b 2 300 $TR --nproc_per_node=2 $TT --size 14B --resolution 720 --sp 2 --checkpointing auto --steps 1 --warmup 2 $Z14
run rows14b 4 150 $TR --nproc_per_node=4 $TT --size 14B --resolution 480 --sp 4 --checkpointing auto --steps 2 --warmup 2 $Z14
run rows14b 2 150 $TR --nproc_per_node=2 $TT --size 14B --resolution 480 --sp 2 --checkpointing auto --steps 2 --warmup 2 $Z14
run more14b 4 300 $TR --nproc_per_node=4 $TT --size 14B --resolution 720 --sp 4 --checkpointing selective --steps 2 --warmup 2 $Z14
run more14b 1 200 $ONE python3 $TT --size 14B --resolution 480 --checkpointing full --steps 2 $Z14
# the 14B at 720p on one GPU: the base offloaded to host memory (ZeRO-3 offload_param), full recompute
run more14b 1 400 $ONE python3 $TT --size 14B --resolution 720 --checkpointing full --steps 2 --ds_config ds_configs/14b_offload.json --tag offload
# gen14b: 14B generation at 720p on 2 and 4 GPUs (generate14b: on 1 GPU)
run gen14b 2 150 $TR --nproc_per_node=2 $GT --size 14B --resolution 720 --sp 2 --measured_steps 1 $CU
run gen14b 4 150 $TR --nproc_per_node=4 $GT --size 14B --resolution 720 --sp 4 --measured_steps 2 $CU
# cli: the training command itself on one GPU with the 14B's defaults (trainer.ds_config=auto, checkpointing and
# compile auto, batch 2) at 480p, on the latent shards in E2E_SHARDS (real shapes: e.g. build_shards --latents
# --vae tiny --t5 tiny --resolution 480 --num_frames 93), after the benchmark row with the defaults at batch 1:
# 1 iteration and a checkpoint; a relaunch to 2 resumes; a relaunch naming the ZeRO-3 JSON is refused (another
# ZeRO stage). Named only.
# (its Dynamo graph breaks and recompiles go to all.log: its first run captured no graph, a traced FA4 check with
# attention_backend=auto, fixed since; the row's `compiled_graphs` and `graph_breaks` show it is gone)
run cli 1 240 env CUDA_VISIBLE_DEVICES=0 TORCH_LOGS=graph_breaks,recompiles python3 $TT --size 14B --resolution 480 --checkpointing auto --steps 2 --tag defaults
if selected cli && [ -n "${E2E_SHARDS:-}" ]; then
  CLI=(-m toolkit.train --experiment predict2_video2world_lora_training_14b_custom_data
       "dataloader_train.dataset.dataset_dir=$E2E_SHARDS" model.config.allow_random_base=true model.config.resolution=480
       "dataloader_train.dataset.video_size=[432,768]" model_parallel.context_parallel_size=1 "job.output_root=$OUT/cli"
       checkpoint.save_iter=1 trainer.logging_iter=1)
  for launch in "trainer.max_iter=1" "trainer.max_iter=2" "trainer.max_iter=3 trainer.ds_config=ds_configs/14b.json"; do
    echo "=== [cli] toolkit.train ... $launch"
    # shellcheck disable=SC2086
    timeout 300 $ONE python3 "${CLI[@]}" $launch > "$OUT/cli.log" 2>&1; echo "exit $?"
    grep -E "ds_config=auto|run folder|resumed|refusing|ZeRO stage|iteration|loss|Error|error" "$OUT/cli.log" | grep -v Warning | tail -12
    cat "$OUT/cli.log" >> "$OUT/all.log"
  done
fi
# lora_generate: LoRA generation on 1 and 2 GPUs gives identical frames
if selected lora_generate; then
  python3 -m benchmarks.make_random_adapter --size 2B --rank 16 --output "$OUT/adapter_2b" > /dev/null
  python3 -c "from PIL import Image; import numpy as np; Image.fromarray((np.random.default_rng(0).random((720,1280,3))*255).astype('uint8')).save('$OUT/input.png')"
  GEN=(-m toolkit.generate --model_size 2B --dit_path random --vae tiny --t5 tiny --input_path "$OUT/input.png" --prompt "a robot arm" --num_steps 4 --lora "$OUT/adapter_2b" --benchmark)
  run lora_generate 1 150 $ONE python3 "${GEN[@]}" --save_path "$OUT/lora_1gpu.mp4"
  run lora_generate 2 150 $TR --nproc_per_node=2 "${GEN[@]}" --num_gpus 2 --save_path "$OUT/lora_2gpu.mp4"
  [ -f "$OUT/lora_2gpu.mp4" ] && python3 - "$OUT" <<'PY'
import sys, numpy as np
from toolkit.data.video import decode_frames, probe_video
a, b = (decode_frames(p, 0, probe_video(p).num_frames).astype(float) for p in (f"{sys.argv[1]}/lora_{n}gpu.mp4" for n in (1, 2)))
print(f"RESULT LoRA generation, 1 vs 2 GPUs: {a.shape[0]} frames, mean |diff| {np.abs(a - b).mean():.3f}, max {np.abs(a - b).max():.0f} (uint8 levels)")
PY
fi
python3 -m benchmarks.report
# the rows this run wrote (benchmarks/results also holds older rows), packed for copying back
find benchmarks/results -name '*.json' -newer "$OUT/.start" | sort > "$OUT/written.txt"
echo "rows written by this run: $(wc -l < "$OUT/written.txt") (list in $OUT/written.txt, packed in $OUT/written.tgz)"
tar czf "$OUT/written.tgz" -T "$OUT/written.txt"
