"""Install the toolkit: `pip install -e .` (after torch; see launch/setup_env.sh)."""

from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="cosmos-lora-toolkit",
    version="0.1.0",
    description="LoRA post-training for NVIDIA Cosmos-Predict2 Video2World (2B, 14B) with DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["toolkit", "toolkit.*", "data_tools", "data_tools.*"]),
    install_requires=requirements,
    # FlashAttention-4 for training and generation on Hopper (docs/performance.md): pip install -e ".[fa4]" (CUDA 13
    # torch builds); training calls its private kernels' functions, pinned to the 4.0.0b36 they were checked and measured
    # with (toolkit/model/fa4_op.py refuses other signatures)
    extras_require={"fa4": ["flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl[cu13]>=4.8"]},
    entry_points={
        "console_scripts": [
            "cosmos-inspect=toolkit.inspect:main",
            "cosmos-train=toolkit.train:main",
            "cosmos-generate=toolkit.generate:main",
            "cosmos-export=toolkit.export:main",
            "cosmos-build-shards=data_tools.build_shards:main",
            "cosmos-inspect-shards=data_tools.inspect_shards:main",
            "cosmos-compute-t5=data_tools.compute_t5:main",
        ]
    },
)
