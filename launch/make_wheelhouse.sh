#!/usr/bin/env bash
# Build a folder of wheels so the toolkit installs on an air-gapped GPU node (no network) with:
#   pip install --no-index --find-links WHEELHOUSE --no-deps WHEELHOUSE/deepspeed-*.whl
#   pip install --no-index --find-links WHEELHOUSE -r WHEELHOUSE/requirements-offline.txt
# The node is assumed to carry torch (CUDA build), accelerate, peft, transformers, numpy (as NVIDIA / cloud images do).
#
# Usage: bash launch/make_wheelhouse.sh [OUT_DIR=.whl] [--python 3.12] [--platform manylinux_2_28_x86_64] [--minimal] [--fa4]
#   --minimal   only what training from latent shards and the training benchmarks need (deepspeed, webdataset,
#               diffusers + dependencies; generation writes MP4s through av);
#               skips wandb and av (about 35 MB), e.g. to fit a 64 MiB transfer limit.
#   --fa4       also FlashAttention-4 for training and generation on Hopper (CUDA 13 torch builds; about 100 MB more):
#               flash-attn-4, nvidia-cutlass-dsl and its cu13 libraries, quack-kernels, apache-tvm-ffi; install with
#               pip install --no-index --no-deps --find-links WHEELHOUSE -r WHEELHOUSE/requirements-fa4.txt
set -euo pipefail
OUT=.whl; PYVER=3.12; PLATFORM=manylinux_2_28_x86_64; MINIMAL=0; FA4=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER=$2; shift 2 ;;
    --platform) PLATFORM=$2; shift 2 ;;
    --minimal) MINIMAL=1; shift ;;
    --fa4) FA4=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) OUT=$1; shift ;;
  esac
done
ABI="cp${PYVER/./}"
mkdir -p "$OUT"
# deepspeed is source-only on PyPI; its wheel is pure Python (ops are JIT-built on first use, none are needed here).
pip wheel --quiet --no-deps "deepspeed==0.19.8" -w "$OUT"
pkgs=("webdataset==1.0.2" "diffusers==0.42.1" "hjson" "pydantic>=2" "braceexpand" "importlib_metadata")
[ "$MINIMAL" = 1 ] || pkgs+=("wandb==0.31.0" "av==18.1.0")
# measured on an H100 with these versions (docs/performance.md); installed with --no-deps, since nvidia-cutlass-dsl
# names its CUDA 12 libraries as a hard requirement; the node must already carry cuda-bindings, protobuf and einops
fa4=()
[ "$FA4" = 0 ] || fa4=("flash-attn-4==4.0.0b36" "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1"
                       "nvidia-cutlass-dsl-libs-core==4.8.1" "nvidia-cutlass-dsl-libs-cu13==4.8.1" "quack-kernels==0.6.5"
                       "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5")
# Dependencies the node already has are not downloaded again: exclude the big ones by pinning them out.
pip download --quiet --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" \
  --platform "$PLATFORM" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform any --no-deps -d "$OUT" "${pkgs[@]}" "${fa4[@]}" annotated-types pydantic-core typing-inspection
if [ "$MINIMAL" = 0 ]; then
  pip download --quiet --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" \
    --platform "$PLATFORM" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    --no-deps -d "$OUT" gitpython gitdb smmap sentry-sdk platformdirs
fi
printf '%s\n' "${pkgs[@]}" > "$OUT/requirements-offline.txt"
[ "$FA4" = 0 ] || printf '%s\n' "${fa4[@]}" > "$OUT/requirements-fa4.txt"
du -sh "$OUT"
ls "$OUT"
