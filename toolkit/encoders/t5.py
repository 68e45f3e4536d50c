"""T5 text encoder (google-t5/t5-11b, d_model 1024) and the T5 embedding file formats.

Legend: n = real tokens of one prompt (EOS counted, at most NUM_TOKENS); D = EMBED_DIM.

Contract (reference/cosmos_predict2_facts.md section 7): tokenize with truncation to 512 tokens (EOS appended by the
tokenizer, no template), run the encoder with the attention mask, take `last_hidden_state`, keep the n real rows.
Stored embeddings are float16 `[n, D]`; the model sees them re-padded with exact zeros to float32 `[512, D]`.

Formats:
- upstream pickle (`t5_xxl/<name>.pickle`): a Python list holding one float16 numpy array `[n, D]`; read here through
  a restricted unpickler that admits only numpy's array-rebuilding globals;
- our shards: numpy `.npy` bytes, loaded with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import T5EncoderModel, T5TokenizerFast

from toolkit.encoders.tiny_t5 import build_tiny_t5

NUM_TOKENS = 512
"""Sequence length the DiT's cross-attention sees (upstream NUM_TOKENS)."""
EMBED_DIM = 1024
"""T5-11B d_model = the DiT's crossattn_emb_channels."""
TINY = "tiny"
_CONFIG_FILE = "config.json"
_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class T5TextEncoder:
    """A transformers `T5EncoderModel` plus its tokenizer, producing Cosmos-format text embeddings."""

    def __init__(self, model: T5EncoderModel, tokenizer: T5TokenizerFast, path: str, folder: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        """What the caller asked for: a folder path or `tiny`."""
        self.folder = folder
        """The folder actually loaded (for `tiny`, the cache folder)."""
        self._identity: dict | None = None

    @classmethod
    def load(
        cls, path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> "T5TextEncoder":
        """Load a local T5 folder (encoder-only or full T5 checkpoint, plus tokenizer) or `tiny` (built and cached).

        device: default cuda when available, else cpu. dtype: default float32; bfloat16 only on cuda.
        """
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _check_dtype(dtype if dtype is not None else torch.float32, device)
        folder = build_tiny_t5() if path == TINY else Path(path).expanduser()
        weight_files = _weight_files(_check_folder(folder))
        tokenizer = T5TokenizerFast.from_pretrained(str(folder))
        model = T5EncoderModel.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=weight_files[0].endswith(".safetensors")
        )
        if model.config.d_model != EMBED_DIM:
            raise ValueError(
                f"T5 folder {folder}: d_model={model.config.d_model} in config.json, but Cosmos-Predict2 needs "
                f"{EMBED_DIM} (google-t5/t5-11b; t5-v1_1-xxl has 4096 and does not fit)."
            )
        model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, path, folder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str], batch_size: int = 8, progress: bool = True) -> list[np.ndarray]:
        """Per prompt, a float16 array `[n, 1024]` of the real tokens (n counts EOS), in the order given.

        A batch is padded to its longest prompt, not to 512: padded keys are masked out and T5's position bias is
        relative, so the real rows equal those of padding to 512 (tests/unit/test_t5.py checks it) at a
        fraction of the cost.
        """
        if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError(f"encode(prompts=...): expected a list of str, got {type(prompts).__name__}")
        if batch_size < 1:
            raise ValueError(f"encode(batch_size={batch_size}): must be a positive integer, e.g. 8")
        starts = range(0, len(prompts), batch_size)
        show = progress and len(starts) > 1
        embeddings: list[np.ndarray] = []
        for start in tqdm(starts, desc="T5", unit="batch", disable=not show):
            embeddings.extend(self._encode_batch(prompts[start : start + batch_size], first_index=start))
        return embeddings

    def encode_padded(self, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
        """float32 `[B, 512, 1024]` exactly as training sees it: the stored float16 rows, zeros at positions >= n."""
        return torch.stack([pad_embedding(array) for array in self.encode(prompts, batch_size, progress=False)])

    def _encode_batch(self, prompts: list[str], first_index: int) -> list[np.ndarray]:
        tokens = self.tokenizer(
            prompts, max_length=NUM_TOKENS, truncation=True, padding="longest", return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            output = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        hidden_B_L_D = output.last_hidden_state
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        arrays = []
        for offset, (hidden_L_D, length) in enumerate(zip(hidden_B_L_D, lengths)):
            array = hidden_L_D[:length].float().cpu().numpy().astype(np.float16)
            if not np.isfinite(array).all():
                raise FloatingPointError(
                    f"T5 embedding of prompt #{first_index + offset} is not finite in float16 "
                    f"(model dtype {self.model.dtype}); load the encoder in float32."
                )
            arrays.append(array)
        return arrays

    def identity(self) -> dict:
        """`{"path", "folder", "files", "sha256"}`: sha256 over the names, sizes and bytes of the config, the weight
        files transformers loads and the tokenizer files. Computed once (t5-11b: tens of GB) and remembered."""
        if self._identity is None:
            names = [_CONFIG_FILE, *_weight_files(self.folder)]
            names += [name for name in _TOKENIZER_FILES if (self.folder / name).is_file()]
            digest = hashlib.sha256()
            for name in names:
                file_path = self.folder / name
                digest.update(f"{name}\0{file_path.stat().st_size}\0".encode())
                with open(file_path, "rb") as handle:
                    while chunk := handle.read(1 << 24):
                        digest.update(chunk)
            self._identity = {
                "path": self.path,
                "folder": str(self.folder.resolve()),
                "files": names,
                "sha256": digest.hexdigest(),
            }
        return dict(self._identity)


def _check_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype not in _DTYPES.values():
        raise ValueError(
            f"T5 dtype={dtype}: allowed are torch.float32 (default) and torch.bfloat16 (cuda only); "
            "float16 overflows inside T5."
        )
    if dtype == torch.bfloat16 and device.type != "cuda":
        raise ValueError(f"T5 dtype=torch.bfloat16 on device {device}: bfloat16 is for cuda; use float32 on cpu.")
    return dtype


def _check_folder(folder: Path) -> Path:
    """Raise one error listing what a T5 folder lacks."""
    needs = (
        "config.json, weights (model.safetensors, pytorch_model.bin or their sharded *.index.json form) and a "
        "tokenizer (spiece.model and/or tokenizer.json), e.g. a local copy of google-t5/t5-11b; "
        "tests and the CPU demo can pass `tiny` instead"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"T5 folder {folder} does not exist. It must hold {needs}.")
    missing = []
    if not (folder / _CONFIG_FILE).is_file():
        missing.append(_CONFIG_FILE)
    if not _weight_files(folder):
        missing.append("weights")
    if not any((folder / name).is_file() for name in ("spiece.model", "tokenizer.json")):
        missing.append("spiece.model/tokenizer.json")
    if missing:
        raise FileNotFoundError(f"T5 folder {folder} lacks {', '.join(missing)}. It must hold {needs}.")
    return folder


def _weight_files(folder: Path) -> list[str]:
    """The weight files transformers loads from `folder`, safetensors first (its own preference); [] if none."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = f"{single}.index.json"
        if (folder / single).is_file():
            return [single]
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [index, *shards]
    return []


def check_embedding(array: object, source: str) -> np.ndarray:
    """Return `array` if it is a float16/float32 numpy array `[n, 1024]`, 1 <= n <= 512; else raise naming `source`."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{source}: expected a numpy array [n_tokens, {EMBED_DIM}], got {type(array).__name__}")
    if array.dtype not in (np.float16, np.float32):
        raise ValueError(f"{source}: dtype {array.dtype}, expected float16 (or float32) T5 embeddings")
    if array.ndim != 2 or array.shape[1] != EMBED_DIM or not 1 <= array.shape[0] <= NUM_TOKENS:
        raise ValueError(
            f"{source}: shape {tuple(array.shape)}, expected [n_tokens, {EMBED_DIM}] with 1 <= n_tokens <= "
            f"{NUM_TOKENS} (t5-11b embeddings trimmed to the real tokens)"
        )
    return array


def pad_embedding(array_n_D: np.ndarray) -> torch.Tensor:
    """Re-pad a trimmed embedding `[n, 1024]` with exact zeros to float32 `[512, 1024]` (what the DiT consumes)."""
    check_embedding(array_n_D, "pad_embedding")
    padded_L_D = torch.zeros(NUM_TOKENS, EMBED_DIM, dtype=torch.float32)
    padded_L_D[: array_n_D.shape[0]] = torch.from_numpy(array_n_D.astype(np.float32))
    return padded_L_D


def _check_storable(array: object, source: str) -> np.ndarray:
    array = check_embedding(array, source)
    if array.dtype != np.float16:
        raise ValueError(f"{source}: dtype {array.dtype}; the stored format is float16, pass array.astype(np.float16)")
    return array


def embedding_to_npy_bytes(array: np.ndarray) -> bytes:
    """The `.npy` bytes of a float16 `[n, 1024]` embedding (the shard member `KEY.t5.npy`)."""
    buffer = io.BytesIO()
    np.save(buffer, _check_storable(array, "embedding_to_npy_bytes"), allow_pickle=False)
    return buffer.getvalue()


def embedding_from_npy_bytes(data: bytes) -> np.ndarray:
    """Read `.npy` bytes written by `embedding_to_npy_bytes`, without pickle."""
    return check_embedding(np.load(io.BytesIO(data), allow_pickle=False), "embedding_from_npy_bytes")


def save_upstream_pickle(path: str | Path, array: np.ndarray) -> None:
    """Write `[array]` (float16 `[n, 1024]`) as upstream's `t5_xxl/<name>.pickle`, via a temporary file and rename."""
    path = Path(path)
    _check_storable(array, f"save_upstream_pickle({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            pickle.dump([array], stream, protocol=4)  # Python's default protocol for 3.8-3.13, as upstream wrote
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _array_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled list of numpy arrays needs, under numpy 1.x and 2.x module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 2-4
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy array allow-list; nothing from it was called."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array-rebuilding ones."""

    def __init__(self, stream: io.BufferedIOBase, source: Path) -> None:
        super().__init__(stream)
        self._source = source
        self._allowed = _array_globals()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise RefusedGlobalError(
            f"{self._source}: refused global {module}.{name}; a T5 embedding pickle may only hold a list with one "
            "numpy array. Regenerate the file with `python -m data_tools.compute_t5`."
        )


def load_upstream_pickle(path: str | Path) -> np.ndarray:
    """Read an upstream `t5_xxl/<name>.pickle` safely; return its float16/float32 array `[n, 1024]`."""
    path = Path(path)
    with open(path, "rb") as stream:
        try:
            content = _ArrayOnlyUnpickler(stream, path).load()
        except RefusedGlobalError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(
                f"{path}: not a readable T5 embedding pickle ({type(error).__name__}: {error}); "
                "regenerate it with `python -m data_tools.compute_t5 --overwrite`"
            ) from error
    if not isinstance(content, list) or len(content) != 1:
        described = f"list of {len(content)}" if isinstance(content, list) else type(content).__name__
        raise ValueError(f"{path}: holds a {described}; the T5 pickle format is a list with exactly one array")
    return check_embedding(content[0], str(path))
