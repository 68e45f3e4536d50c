"""The Wan2.1 VAE (Cosmos-Predict2 "tokenizer") through diffusers' `AutoencoderKLWan`, with the Cosmos normalisation.

Shapes: B batch, C=3 pixel channels, T pixel frames, H/W pixels; latents 16 channels, t = 1 + (T-1)/4, h = H/8, w = W/8.

Facts (`reference/cosmos_predict2_facts.md` sections 3 and 6):
- 8x spatial, 4x causal temporal compression: frame 0 alone, then groups of 4, so T must be 1 + 4k.
- Only the posterior mean mu is used (no sampling); normalised latent z = (mu - mean_c) / std_c per channel.
- Pixels in [-1, 1]. Cosmos runs the VAE in bf16; we do too on GPU, but normalise in fp32 (Cosmos normalises in
  bf16, a difference of at most about one bf16 step).

Memory, and what we rely on in diffusers 0.42 (`AutoencoderKLWan._encode/_decode`):
- Encoding runs frame 0, then each group of 4 frames, through the encoder with a per-layer causal cache of the last
  2 frames; the result equals Wan's own 4-frame chunking and Cosmos' 16-frame chunking. Decoding runs one latent
  frame at a time with the same cache. So activations are only ever held for about 4-6 frames, and a 93 x 704 x 1280
  clip fits on one GPU without tiling. Measured on one H100 (bf16, random full-size weights, torch 2.11): encode
  3.3 s with 7.7 GiB above the weights, decode 5.4 s with 10.0 GiB.
- `tiling=True` (diffusers `enable_tiling`, 256 px tiles, 192 px stride) cuts that to about 1 GiB but took 3x as long
  and blends overlapping tiles, so its latents differ from the official untiled ones (by up to 0.4 in normalised
  units on random weights): leave it off unless memory forces.
- Slicing (one sample of a batch at a time) is always on: batch size then costs no extra activation memory.
- diffusers clamps the decoded video to [-1, 1]; the Cosmos tokenizer does not (its video writer clamps later).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from toolkit.encoders.latent_grid import (  # noqa: F401  (re-exported)
    LATENT_CHANNELS,
    PIXEL_SIZE_MULTIPLE,
    num_latent_frames,
    num_pixel_frames,
)
from toolkit.encoders.wan_vae_keys import (
    diffusers_to_wan_key,
    extract_state_dict,
    infer_wan_config,
    wan_to_diffusers_key,
)

# Per-channel latent statistics of the Wan2.1 VAE (facts section 6; identical in Wan2.1, Cosmos and diffusers).
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
TINY_SEED = 0
# Names the deterministic initialisation of the tiny model; change it whenever `_fill_deterministic` changes.
TINY_INIT_SCHEME = "wan_vae_tiny_init_v1"


def check_video_shape(shape: tuple[int, ...] | torch.Size) -> None:
    """Raise a clear error unless `shape` is a [B, 3, 1 + 4k, H, W] video with H and W multiples of 16."""
    if len(shape) != 5 or shape[1] != 3:
        raise ValueError(
            f"video shape {tuple(shape)}: expected [B, 3, T, H, W] (batch, RGB, frames, height, width); "
            "permute a [B, T, H, W, 3] array with .permute(0, 4, 1, 2, 3)."
        )
    num_latent_frames(shape[2])
    height, width = shape[3], shape[4]
    if height % PIXEL_SIZE_MULTIPLE or width % PIXEL_SIZE_MULTIPLE:
        multiple = PIXEL_SIZE_MULTIPLE
        raise ValueError(
            f"video shape {tuple(shape)}: height {height} and width {width} must be multiples of {multiple} "
            f"(8x VAE downsampling, then 2x2 DiT patches); resize or crop, e.g. to "
            f"{multiple * (height // multiple)} x {multiple * (width // multiple)}."
        )


def tiny_config() -> dict:
    """`AutoencoderKLWan` arguments of the tiny VAE: the Wan2.1 structure and compression at toy width."""
    return {
        "base_dim": 8,
        "z_dim": LATENT_CHANNELS,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "latents_mean": list(LATENT_MEAN),
        "latents_std": list(LATENT_STD),
    }


def _fill_deterministic(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded CPU generator, so the result is the same on any machine.

    Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm gammas ~ 1 + N(0, 0.1^2) (not all ones, so a mis-mapped
    norm changes the output).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if name.endswith("gamma"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("bias"):
                value = 0.02 * noise
            else:
                value = noise / math.sqrt(math.prod(parameter.shape[1:]))
            parameter.copy_(value)


def _update_digest(digest: "hashlib._Hash", path: Path) -> None:
    """Feed a file's bytes into `digest`, streamed in 1 MiB blocks."""
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)


def _sha256_of_file(path: Path) -> str:
    """sha256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    _update_digest(digest, path)
    return digest.hexdigest()


def _sha256_of_folder(folder: Path) -> str:
    """One sha256 over every file below `folder`: its relative name, a NUL, then its bytes, in sorted name order."""
    digest = hashlib.sha256()
    for file in sorted(file for file in folder.rglob("*") if file.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        _update_digest(digest, file)
    return digest.hexdigest()


def _default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """cuda when available, else cpu; bf16 on cuda (as Cosmos runs the VAE), fp32 on cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, dtype


def _load_wan_file(path: Path) -> AutoencoderKLWan:
    """Build an `AutoencoderKLWan` from an original-format Wan2.1 file, checking that every key maps exactly."""
    source = str(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{source}: cannot be read as a torch state dict with weights_only=True ({error}).") from error
    state_dict = extract_state_dict(loaded, source)
    config = infer_wan_config(state_dict, source)
    model = AutoencoderKLWan(**config)
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape = [], []
    for wan_key, tensor in state_dict.items():
        diffusers_key = wan_to_diffusers_key(wan_key, config["num_res_blocks"])
        if diffusers_key is None or diffusers_key not in expected:
            unexpected.append(wan_key)
            continue
        mapped[diffusers_key] = tensor
        if tensor.shape != expected[diffusers_key].shape:
            wrong_shape.append(f"{wan_key} {tuple(tensor.shape)} != {tuple(expected[diffusers_key].shape)}")
    missing = [diffusers_to_wan_key(key, config["num_res_blocks"]) for key in expected if key not in mapped]
    if unexpected or missing or wrong_shape:
        raise ValueError(
            f"{source}: not a Wan2.1 VAE state dict for the inferred config {config}. "
            f"Unexpected keys ({len(unexpected)}): {sorted(unexpected)}; "
            f"missing keys ({len(missing)}): {sorted(missing)}; "
            f"wrong shapes ({len(wrong_shape)}): {wrong_shape}. Pass the official tokenizer/tokenizer.pth unmodified "
            "or a file written by WanVAE.save_wan_format."
        )
    model.load_state_dict(mapped, strict=True)
    return model


def _load_diffusers_folder(folder: Path, dtype: torch.dtype) -> AutoencoderKLWan:
    """Load a diffusers `vae/` folder, rejecting configs that are not the Wan2.1 VAE Cosmos was trained with."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = f" It has a vae/ subfolder: pass {folder / 'vae'}." if (folder / "vae" / "config.json").is_file() else ""
        raise ValueError(f"{folder}: no config.json, so this is not a diffusers AutoencoderKLWan folder.{hint}")
    config = json.loads(config_path.read_text())
    problems = []
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        problems.append(f"_class_name={config['_class_name']!r} (expected 'AutoencoderKLWan')")
    if config.get("z_dim", LATENT_CHANNELS) != LATENT_CHANNELS:
        problems.append(f"z_dim={config['z_dim']} (Cosmos-Predict2 needs {LATENT_CHANNELS} latent channels)")
    if config.get("is_residual", False) or config.get("patch_size") is not None:
        problems.append("is_residual/patch_size set: that is the Wan2.2 VAE, Cosmos-Predict2 uses Wan2.1")
    for key, constants in (("latents_mean", LATENT_MEAN), ("latents_std", LATENT_STD)):
        values = config.get(key, list(constants))
        if len(values) != len(constants) or any(abs(a - b) > 1e-6 for a, b in zip(values, constants)):
            problems.append(f"{key}={values} differs from the Wan2.1 statistics this toolkit normalises with")
    if problems:
        raise ValueError(f"{config_path}: " + "; ".join(problems) + ". Pass the Wan2.1 VAE folder (vae/).")
    return AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype)


class WanVAE:
    """A frozen Wan2.1 VAE that maps [-1, 1] videos to normalised Cosmos latents and back.

    Build it with `WanVAE.load(path)`; `model` is the underlying diffusers `AutoencoderKLWan`.
    """

    def __init__(self, model: AutoencoderKLWan, identity: dict, tiling: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.model.enable_slicing()
        if tiling:
            self.model.enable_tiling()
        self.tiling = tiling
        self._identity = identity
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.latent_mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=self.device).view(1, -1, 1, 1, 1)
        self.latent_std = torch.tensor(LATENT_STD, dtype=torch.float32, device=self.device).view(1, -1, 1, 1, 1)

    @staticmethod
    def tiny_config() -> dict:
        """`AutoencoderKLWan` arguments of the `tiny` VAE (see module-level `tiny_config`)."""
        return tiny_config()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        tiling: bool = False,
    ) -> WanVAE:
        """Load the VAE from `tokenizer.pth` (original Wan keys), a diffusers `vae/` folder, or `"tiny"`.

        `device` defaults to cuda when available; `dtype` to bf16 on cuda and fp32 on cpu. `tiling` trades exactness
        for memory (see the module docstring).
        """
        device, dtype = _default_device_dtype(device, dtype)
        if str(path) == "tiny":
            model = AutoencoderKLWan(**tiny_config())
            _fill_deterministic(model, TINY_SEED)
            identity = {"format": "tiny", "path": "tiny", "config": tiny_config(), "seed": TINY_SEED}
        else:
            resolved = Path(path).expanduser().resolve()
            if resolved.is_dir():
                model = _load_diffusers_folder(resolved, dtype)
                identity = {"format": "diffusers", "path": str(resolved)}
            elif resolved.is_file():
                model = _load_wan_file(resolved)
                identity = {"format": "wan", "path": str(resolved)}
            else:
                raise FileNotFoundError(
                    f"VAE path {path!r} does not exist: pass <model_dir>/tokenizer/tokenizer.pth, a diffusers vae/ "
                    "folder, or 'tiny'."
                )
        # Module.type casts the dtype without diffusers' `to(dtype)` warning about (here empty) fp32 module lists.
        return cls(model.to(device=device).type(dtype), identity, tiling=tiling)

    def identity(self) -> dict:
        """Path and content hash of the weights (for shard manifests): sha256 of the file, of the folder's files
        (names and contents), or for `tiny` of its config, seed and init scheme. Computed once, then cached."""
        if "sha256" not in self._identity:
            kind = self._identity["format"]
            if kind == "tiny":
                recipe = {"config": tiny_config(), "seed": TINY_SEED, "init": TINY_INIT_SCHEME}
                self._identity["sha256"] = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
            else:
                path = Path(self._identity["path"])
                if kind == "diffusers":
                    self._identity["sha256"] = _sha256_of_folder(path)
                else:
                    self._identity["sha256"] = _sha256_of_file(path)
        return dict(self._identity)

    @torch.no_grad()
    def encode(self, video_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, 1 + (T-1)/4, H/8, W/8] in fp32 of a video in [-1, 1] (posterior mean only)."""
        check_video_shape(video_B_C_T_H_W.shape)
        if not video_B_C_T_H_W.is_floating_point():
            raise ValueError(
                f"video dtype {video_B_C_T_H_W.dtype}: expected floats in [-1, 1]; convert uint8 with x / 127.5 - 1."
            )
        low, high = video_B_C_T_H_W.aminmax()
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"video values span [{low.item():.3f}, {high.item():.3f}]: expected [-1, 1]; "
                "map [0, 255] with x / 127.5 - 1 or [0, 1] with 2x - 1."
            )
        video_B_C_T_H_W = video_B_C_T_H_W.to(device=self.device, dtype=self.dtype)
        mu_B_C_t_h_w = self.model.encode(video_B_C_T_H_W).latent_dist.mean.float()
        return (mu_B_C_t_h_w - self.latent_mean) / self.latent_std

    @torch.no_grad()
    def decode(self, latent_B_C_t_h_w: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, 1 + 4(t-1), 8h, 8w] in [-1, 1] (fp32) from normalised latents."""
        shape = tuple(latent_B_C_t_h_w.shape)
        if len(shape) != 5 or shape[1] != LATENT_CHANNELS or shape[2] < 1:
            raise ValueError(
                f"latent shape {shape}: expected [B, {LATENT_CHANNELS}, t, h, w] normalised Wan2.1 latents with t >= 1."
            )
        mu_B_C_t_h_w = latent_B_C_t_h_w.to(device=self.device, dtype=torch.float32) * self.latent_std + self.latent_mean
        return self.model.decode(mu_B_C_t_h_w.to(self.dtype)).sample.float()

    def save_wan_format(self, path: str | os.PathLike) -> None:
        """Write the current weights as an original-format Wan2.1 state dict (like `tokenizer/tokenizer.pth`).

        Atomic: written to a temporary name in the same folder, then renamed.
        """
        num_res_blocks = self.model.config.num_res_blocks
        state_dict = {
            diffusers_to_wan_key(key, num_res_blocks): tensor.detach().cpu().contiguous()
            for key, tensor in self.model.state_dict().items()
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        torch.save(state_dict, temporary)
        os.replace(temporary, target)
