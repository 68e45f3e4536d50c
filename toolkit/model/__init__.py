"""Plain-PyTorch Cosmos-Predict2 DiT: presets, network, weights IO. Imports torch only."""

from toolkit.model.dit import CosmosDiT, build_dit, count_parameters
from toolkit.model.presets import PRESETS, DiTConfig, resolve_dit_config

__all__ = ["CosmosDiT", "DiTConfig", "PRESETS", "build_dit", "count_parameters", "resolve_dit_config"]
