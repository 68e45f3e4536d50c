"""Everything a training run holds, built once: topology, engine, adapter, EMA, data streams, tracker, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.config import RunConfig, run_dir
from toolkit.data.loader import LoaderSpec, build_eval_stream, build_train_stream
from toolkit.lora.apply import lora_named_parameters
from toolkit.parallel.engine import build_engine, gathered_parameters
from toolkit.parallel.topology import Topology
from toolkit.train.build import AssembledModel, assemble_model
from toolkit.train.checkpoint import CheckpointPaths
from toolkit.train.optim import LambdaLinear, PowerEMA, build_optimizer
from toolkit.train.tracking import Tracker, build_tracker


@dataclass
class Session:
    cfg: RunConfig
    topology: Topology
    assembled: AssembledModel
    engine: object
    optimizer: object
    lora_names: list[str]
    lora_params: list[torch.nn.Parameter]
    ema: PowerEMA | None
    lr_factor: LambdaLinear | None
    ds_config: dict
    run_dir: Path
    paths: CheckpointPaths
    tracker: Tracker
    vae_path: str | None = None
    vae: object | None = None
    eval_stream: object | None = None
    dataset_manifests: list[dict] = field(default_factory=list)

    @property
    def model(self):
        return self.assembled.model

    def split_fn(self):
        """Target-side time split under sequence parallelism (None without it)."""
        sp = self.assembled.model.sequence_parallel
        return sp.split if self.assembled.sp_size > 1 else None

    def gathered_lora_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 LoRA tensors (PEFT names) on every rank, gathered under ZeRO-3."""
        with gathered_parameters(self.lora_params):
            return {name: p.detach().float().cpu().clone() for name, p in zip(self.lora_names, self.lora_params)}


def loader_spec(cfg: RunConfig, dataset_dirs, weights, batch_size: int, num_workers: int) -> LoaderSpec:
    """The loader's view of the run config (training or validation folders)."""
    dataset = cfg.dataloader_train.dataset
    return LoaderSpec(
        dataset_dirs=list(dataset_dirs),
        weights=list(weights) or None,
        batch_size=batch_size,
        num_frames=cfg.model.num_frames,
        video_size=tuple(dataset.video_size),
        resize=dataset.resize,
        shuffle_buffer=dataset.shuffle_buffer,
        num_workers=num_workers,
        seed=cfg.job.seed,
        pin_memory=cfg.dataloader_train.pin_memory,
    )


def train_spec(cfg: RunConfig) -> LoaderSpec:
    loader = cfg.dataloader_train
    if not loader.dataset.dataset_dir:
        raise ValueError(
            "dataloader_train.dataset.dataset_dir is empty: pass the shard folder, e.g. "
            "dataloader_train.dataset.dataset_dir=shards/ (build it with python -m data_tools.build_shards)"
        )
    return loader_spec(cfg, loader.dataset.dataset_dir, loader.dataset.weights, loader.batch_size, loader.num_workers)


def _lr_factor(cfg: RunConfig) -> LambdaLinear | None:
    s = cfg.scheduler
    if s.type == "constant":
        return None
    return LambdaLinear(s.warm_up_steps, s.cycle_lengths, s.f_start, s.f_max, s.f_min)


def load_vae(topology: Topology, vae_path: str | None, reason: str):
    """The VAE for the decode path (the shards hold no latents matching the requested size and frames)."""
    from toolkit.encoders.wan_vae import WanVAE

    if not vae_path:
        raise ValueError(
            f"videos are encoded during training ({reason}): pass --vae PATH (the model's tokenizer/tokenizer.pth, a diffusers vae/ folder, or `tiny`), or rebuild the "
            "shards with --latents"
        )
    return WanVAE.load(vae_path, device=topology.device)


def build_session(cfg: RunConfig, topology: Topology, ds_config: dict, vae_path: str | None = None) -> Session:
    """Assemble model, optimizer, engine and data in the documented order (toolkit/train/build.py)."""
    assembled = assemble_model(cfg, topology, ds_config)
    named = lora_named_parameters(assembled.model)
    names, params = [n for n, _ in named], [p for _, p in named]
    o = cfg.optimizer
    optimizer = build_optimizer(params, o.lr, o.weight_decay, o.betas, o.eps)
    _, engine, optimizer = build_engine(assembled.model, optimizer, ds_config, topology.device)
    directory = run_dir(cfg)
    session = Session(
        cfg=cfg,
        topology=topology,
        assembled=assembled,
        engine=engine,
        optimizer=optimizer,
        lora_names=names,
        lora_params=params,
        ema=None,
        lr_factor=_lr_factor(cfg),
        ds_config=ds_config,
        run_dir=directory,
        paths=CheckpointPaths(directory / "checkpoints"),
        tracker=build_tracker(
            cfg.wandb.mode, topology.is_main, cfg.job.project, cfg.job.group, cfg.job.name, cfg.to_dict(), directory,
            cfg.wandb.entity or None, cfg.wandb.tags,
        ),
    )
    if cfg.model.ema.enabled:
        with gathered_parameters(params):
            session.ema = PowerEMA(params, cfg.model.ema.rate)
    session.vae_path = vae_path
    val = cfg.dataloader_val
    if val.dataset_dir and val.dataset_dir != "mock":
        session.eval_stream = build_eval_stream(loader_spec(cfg, [val.dataset_dir], [], val.batch_size, 0), val.num_batches)
    session.dataset_manifests = [
        {"folder": str(folder), "sha256": _manifest_hash(Path(folder))} for folder in cfg.dataloader_train.dataset.dataset_dir
    ]
    return session


def _manifest_hash(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def build_stream(session: Session, start_step: int):
    """The training stream at `start_step`; loads the VAE when the stream decodes video (no matching latents)."""
    stream = build_train_stream(train_spec(session.cfg), session.topology.dp_rank, session.topology.dp_size, start_step)
    needs_vae = stream.path == "decode" or (session.eval_stream is not None and session.eval_stream.path == "decode")
    if needs_vae and session.vae is None:
        session.vae = load_vae(session.topology, session.vae_path, stream.path_reason)
    return stream

