"""Validation videos during training (`wandb.log_videos=true`): sample the first held-out clip with the current
adapter, decode, write an mp4 (PyAV, by us) into RUN/samples/ and log it to wandb by path.

The held-out clip's first latent frame is the condition, its T5 embedding the prompt; the unconditional branch is
the all-zero embedding (what the text dropout trains; the negative-prompt encoder does not run during training).
Every rank takes part (the network may be sequence-parallel: its output is gathered for sampling); rank 0 writes.
Costs 36 guided network calls per validation (35 steps, upstream's sampler): a few seconds on the tiny preset,
minutes for the 2B at 720p.
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.diffusion import SamplerConfig, condition_mask, guided_denoise_fn, initial_noise, sample

FPS = {93: 16, 61: 10}


def sample_video(session, batch: dict, iteration: int) -> Path | None:
    """Write RUN/samples/iter_{N:09d}.mp4 on rank 0 and log it; returns the path (None on other ranks)."""
    from toolkit.data.video import write_mp4
    from toolkit.pipeline import video_to_frames
    from toolkit.train.session import load_vae

    cfg, topo = session.cfg, session.topology
    if session.vae is None:
        session.vae = load_vae(topo, session.vae_path, "wandb.log_videos=true decodes the validation samples")
    device = topo.device
    latent = batch["latents"][:1].to(device) if "latents" in batch else session.vae.encode(batch["video"][:1].to(device))
    text = batch["t5"][:1].to(device)
    B, _, T, H, W = latent.shape
    mask = condition_mask(torch.ones(B, dtype=torch.int64, device=device), (B, 1, T, H, W))
    sampler = SamplerConfig()
    denoise_fn = guided_denoise_fn(session.engine, latent, mask, text, torch.zeros_like(text), sampler.guidance, cfg.model.objective)
    sequence = session.model.sequence_parallel
    gather = getattr(sequence, "gather_output", None)
    if gather is not None:
        sequence.gather_output = True
    try:
        with torch.no_grad():
            x0 = sample(denoise_fn, initial_noise(latent.shape, cfg.job.seed, sampler).to(device), sampler)
            frames = video_to_frames(session.vae.decode(x0))
    finally:
        if gather is not None:
            sequence.gather_output = gather
    if not topo.is_main:
        return None
    path = session.run_dir / "samples" / f"iter_{iteration:09d}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, frames, FPS.get(cfg.model.num_frames, cfg.model.fps))
    session.tracker.log_video("val/sample", path, step=iteration, caption=f"iteration {iteration}, {batch['keys'][0]}")
    return path
