"""Write a random (non-zero) PEFT adapter for a preset, for GPU checks of LoRA generation without a training run.

    python -m benchmarks.make_random_adapter --size 2B --rank 16 --output /tmp/adapter_2b
"""

from __future__ import annotations

import argparse

import torch

from toolkit.lora.state import Adapter, save_peft_adapter
from toolkit.model import build_dit

TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2B", choices=["2B", "14B", "tiny"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--scale", type=float, default=0.02, help="std of the random lora_A / lora_B entries")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in build_dit(args.size, device="meta").named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            state[f"{name}.lora_A.weight"] = torch.randn(args.rank, module.in_features, generator=generator) * args.scale
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, args.rank, generator=generator) * args.scale
    adapter = Adapter(state, {"model_size": args.size, "alpha": float(args.rank), "targets": list(TARGETS), "format": "peft"})
    print("wrote", save_peft_adapter(args.output, adapter, torch.bfloat16))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
