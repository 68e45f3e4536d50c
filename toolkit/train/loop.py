"""The training loop: batch, noise level, conditioning, forward, loss, backward, step, EMA, metrics, checkpoint.

Random draws of step n come from a generator seeded by (seed, data-parallel rank, n): sequence-parallel peers draw
the same values, and a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.distributed as dist

from toolkit.diffusion.loss import training_loss, validation_loss
from toolkit.train.checkpoint import find_resumable, load_engine_state, save_checkpoint
from toolkit.train.metrics import format_log_line, mfu, num_tokens, sample_flops
from toolkit.train.session import Session, build_stream

RESUME_MUST_MATCH = (
    "model.config.model_size", "model.config.lora_rank", "model.config.lora_alpha", "model.config.lora_target_modules",
    "model.config.num_frames", "dataloader_train.batch_size", "trainer.grad_accum_iter", "job.seed",
    "model_parallel.context_parallel_size",
)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class ResumeMismatchError(ValueError):
    """The checkpoint to resume was trained with settings that differ where it matters."""


def step_generator(seed: int, dp_rank: int, iteration: int, micro: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * 1_000_003 + dp_rank) * 1_000_033 + iteration) * 64 + micro)
    return generator


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def check_resume_compatible(saved: dict, current: dict, world_size: int, saved_world: int,
                            saved_zero_stage: int | None = None, zero_stage: int | None = None) -> None:
    """Refuse a checkpoint whose run differs in what the resumed state depends on: RESUME_MUST_MATCH, the world size
    and the ZeRO stage (its optimizer state is partitioned for the stage it was saved under; `trainer.ds_config=auto`
    chooses the stage from the GPUs, so a relaunch on other cards could choose another)."""
    a, b = _flatten(saved), _flatten(current)
    diffs = [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in RESUME_MUST_MATCH if a.get(k) != b.get(k)]
    if saved_world != world_size:
        diffs.append(f"world size: checkpoint {saved_world}, now {world_size} (the data order and optimizer partitions depend on it)")
    if saved_zero_stage is not None and zero_stage is not None and saved_zero_stage != zero_stage:
        diffs.append(f"ZeRO stage: checkpoint {saved_zero_stage} (trainer.ds_config={a.get('trainer.ds_config')}), now "
                     f"{zero_stage} ({b.get('trainer.ds_config')}); set trainer.ds_config={a.get('trainer.ds_config')} "
                     "to resume it")
    if diffs:
        raise ResumeMismatchError(
            "refusing to resume: the configuration changed in what matters:\n  " + "\n  ".join(diffs)
            + "\nstart a new run (job.name=...) or restore these values"
        )


def _states(session: Session, iteration: int, consecutive_nan: int, skipped: int, losses: list[float]) -> dict:
    lora = session.gathered_lora_state()
    ema = None
    if session.ema is not None:
        ema = {name: s.clone() for name, s in zip(session.lora_names, session.ema.shadow)}
    cfg = session.cfg
    model_state = {
        "lora": lora,
        "ema_lora": ema,
        "base": session.assembled.base_identity,
        "config": cfg.to_dict(),
        "iteration": iteration,
        "adapter": {
            "model_size": cfg.model.model_size, "rank": cfg.model.lora_rank, "alpha": cfg.model.lora_alpha,
            "targets": list(session.assembled.lora.targets), "resolution": cfg.model.resolution,
            "num_frames": cfg.model.num_frames, "fps": cfg.model.fps,
            "video_size": list(cfg.dataloader_train.dataset.video_size), "datasets": session.dataset_manifests,
        },
    }
    trainer = {"iteration": iteration, "consecutive_nan": consecutive_nan, "skipped_steps": skipped,
               "world_size": session.topology.world_size, "losses": list(losses)}
    return {
        "model": model_state,
        "optim": {"engine_checkpoint": session.paths.engine_tag(iteration), "zero_stage": session.ds_config.get("zero_optimization", {}).get("stage")},
        "scheduler": {"iteration": iteration, "type": cfg.scheduler.type},
        "trainer": trainer,
    }


def _resume(session: Session) -> tuple[int, dict]:
    cfg = session.cfg
    requested = None
    if cfg.checkpoint.load_path:
        name = cfg.checkpoint.load_path.rstrip("/").split("/")[-1]
        requested = int(name.split("_")[1].split(".")[0]) if name.startswith("iter_") else None
    found = find_resumable(session.paths, requested)
    if found is None:
        return 0, {}
    iteration, states = found
    check_resume_compatible(states["model"]["config"], cfg.to_dict(), session.topology.world_size, states["trainer"]["world_size"],
                            states["optim"].get("zero_stage"), session.ds_config.get("zero_optimization", {}).get("stage"))
    if cfg.checkpoint.load_training_state:
        load_engine_state(session.paths, iteration, session.engine)
        if session.ema is not None and states["model"]["ema_lora"] is not None:
            session.ema.load_state_dict({"shadow": [states["model"]["ema_lora"][n] for n in session.lora_names]})
    return iteration, states["trainer"]


def _set_lr(session: Session, iteration: int) -> float:
    factor = session.lr_factor(iteration) if session.lr_factor is not None else 1.0
    lr = session.cfg.optimizer.lr * factor
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    return lr


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    return flag.item() == 0


def _latents(session: Session, batch: dict) -> torch.Tensor:
    device = session.topology.device
    if "latents" in batch:
        return batch["latents"].to(device, non_blocking=True)
    with torch.no_grad():
        return session.vae.encode(batch["video"].to(device, non_blocking=True))


def sequence_parallel_gradient_scale(engine) -> float:
    """The factor on each rank's loss in backward that makes every ZeRO stage train on the full-sequence mean.

    Each rank's loss is the mean over its own equal share of the tokens. ZeRO-3 averages gradients over every rank,
    sequence-parallel ranks included, which is exactly that mean (deepspeed_notes trap 3). ZeRO stages 1 and 2
    divide only by the number of data-parallel replicas, so the SP ranks' gradients are summed: sp times too large
    (tests/distributed pin both against a single-process SGD run). Returns 1/sp there, else 1."""
    sp = getattr(engine, "sequence_parallel_size", 1) or 1
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 3
    return 1.0 / sp if sp > 1 and stage < 3 else 1.0


def forward_backward_step(engine, latent, text, objective, generator, split_fn) -> torch.Tensor | None:
    """One micro-batch: loss, the ranks' agreement that it is finite (the step's one host sync: skipping must be
    decided before backward), backward (scaled for ZeRO-1/2 under SP, see sequence_parallel_gradient_scale) and the
    engine step. Returns the detached (unscaled) loss, or None when skipped."""
    loss, _ = training_loss(engine, latent, text, objective, generator, split_fn)
    if not _all_finite(loss):
        return None
    scale = sequence_parallel_gradient_scale(engine)
    engine.backward(loss * scale if scale != 1.0 else loss)
    engine.step()
    return loss.detach()


def train_step(session: Session, batches, iteration: int) -> torch.Tensor | None:
    """One optimizer step over grad_accum_iter micro-batches; returns this rank's mean loss (on the device, so no
    host sync), or None when a non-finite loss skipped the step."""
    cfg, topo, engine = session.cfg, session.topology, session.engine
    losses = []
    for micro in range(cfg.trainer.grad_accum_iter):
        batch = next(batches)
        latent = _latents(session, batch)
        text = batch["t5"].to(topo.device, non_blocking=True)
        generator = step_generator(cfg.job.seed, topo.dp_rank, iteration, micro, topo.device)
        loss = forward_backward_step(engine, latent, text, cfg.model.objective, generator, session.split_fn())
        if loss is None:
            return None
        losses.append(loss)
    if session.ema is not None:
        from toolkit.parallel.engine import gathered_parameters

        with gathered_parameters(session.lora_params):
            session.ema.update(session.lora_params, iteration + cfg.model.ema.iteration_shift)
    return torch.stack(losses).mean()


def reduce_step(loss: torch.Tensor | None, stop: bool, device: torch.device) -> tuple[float, bool]:
    """(mean loss over ranks, whether any rank was asked to stop) with one all-reduce and one host read per step."""
    flag = torch.tensor(1.0 if stop else 0.0, dtype=torch.float64, device=device)
    value = torch.stack([loss.double() if loss is not None else torch.zeros_like(flag), flag])
    if dist.is_initialized():
        dist.all_reduce(value)
    total, stops = value.tolist()
    mean = total / (dist.get_world_size() if dist.is_initialized() else 1)
    return (mean if loss is not None else float("nan")), stops > 0


def _reduce_mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


TEST_SIGNAL_ENV = "COSMOS_TOOLKIT_TEST_SIGNAL_AT"
"""Test hook: `KILL:7` or `TERM:7` makes the process signal itself right after iteration 7 (kill/resume tests)."""


def _test_signal(iteration: int) -> None:
    spec = os.environ.get(TEST_SIGNAL_ENV)
    if spec:
        name, at = spec.split(":")
        if iteration == int(at):
            os.kill(os.getpid(), getattr(signal, "SIG" + name))


class _Preemption:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True


def run_validation(session: Session, iteration: int) -> dict:
    """Fixed-noise validation losses (and, with wandb.log_videos, a sampled video of the first held-out clip)."""
    cfg = session.cfg
    results: dict[float, list[float]] = {}
    generator = step_generator(cfg.job.seed, 0, 10**6, 0, session.topology.device)
    for index, batch in enumerate(session.eval_stream):
        if index == 0 and cfg.wandb.log_videos:
            from toolkit.train.samples import sample_video

            sample_video(session, batch, iteration)
        latent = _latents(session, batch)
        text = batch["t5"].to(session.topology.device)
        for sigma, value in validation_loss(session.engine, latent, text, list(cfg.dataloader_val.sigmas), cfg.model.objective, generator, session.split_fn()).items():
            results.setdefault(sigma, []).append(value)
    return {f"val/loss_sigma_{s:g}": _reduce_mean(sum(v) / len(v), session.topology.device) for s, v in results.items()}


def train(session: Session, log=print) -> dict:
    """Run (or resume) to trainer.max_iter; returns a summary. Saves on SIGTERM and at save_iter and the end."""
    cfg, topo = session.cfg, session.topology
    start, trainer_state = _resume(session)
    consecutive_nan, skipped = trainer_state.get("consecutive_nan", 0), trainer_state.get("skipped_steps", 0)
    losses: list[float] = list(trainer_state.get("losses", []))
    if start:
        log(f"resumed from iteration {start} ({session.paths.root})")
    stream = build_stream(session, start * cfg.trainer.grad_accum_iter)
    if topo.is_main:
        log(stream.describe())
    batches = iter(stream)
    dit = session.assembled.model.config
    _, t, h, w = cfg.latent_shape()
    tokens = num_tokens(dit, t, h, w)
    step_flops = sample_flops(dit, tokens).lora_step * cfg.dataloader_train.batch_size * topo.dp_size * cfg.trainer.grad_accum_iter
    preemption, iteration, window_start, window_steps = _Preemption(), start, time.perf_counter(), 0
    progress = _progress(topo.is_main, start, cfg.trainer.max_iter)
    val_history: list[dict] = list(trainer_state.get("val_history", []))
    if session.eval_stream is not None and not val_history:
        val_history.append({"iteration": start, **run_validation(session, start)})
        if topo.is_main:
            progress.write("validation before training (base model + fresh adapter): " + _format_val(val_history[-1]))
    while iteration < cfg.trainer.max_iter:
        lr = _set_lr(session, iteration)
        step_loss = train_step(session, batches, iteration)
        applied = step_loss is not None
        loss, stop = reduce_step(step_loss, preemption.requested, topo.device)
        consecutive_nan = 0 if applied else consecutive_nan + 1
        skipped += 0 if applied else 1
        if consecutive_nan >= cfg.trainer.max_consecutive_nan_steps:
            raise NonFiniteLossError(
                f"{consecutive_nan} consecutive steps had a non-finite loss (last at iteration {iteration}); lower "
                "optimizer.lr, check the data (inspect_shards --all), or resume from an earlier checkpoint"
            )
        iteration += 1
        window_steps += 1
        losses.append(loss)
        progress.update(1)
        if iteration == start + 1 and topo.is_main and (fallback := _compile_fallback(session)):
            progress.write(fallback)
        if iteration % cfg.trainer.logging_iter == 0 or iteration == cfg.trainer.max_iter:
            values = _log_values(session, losses[-1], lr, window_steps, window_start, step_flops, tokens, skipped)
            if topo.is_main:
                progress.write(format_log_line(iteration, cfg.trainer.max_iter, values))
                session.tracker.log({f"train/{k}": v for k, v in values.items() if v is not None}, step=iteration)
            window_start, window_steps = time.perf_counter(), 0
        if session.eval_stream is not None and (iteration % cfg.trainer.validation_iter == 0 or iteration == cfg.trainer.max_iter):
            val_history.append({"iteration": iteration, **run_validation(session, iteration)})
            if topo.is_main:
                progress.write(_format_val(val_history[-1]))
                session.tracker.log({k: v for k, v in val_history[-1].items() if k != "iteration"}, step=iteration)
        stop = stop or (preemption.requested and not dist.is_initialized())
        if iteration % cfg.checkpoint.save_iter == 0 or iteration == cfg.trainer.max_iter or stop:
            states = _states(session, iteration, consecutive_nan, skipped, losses)
            states["trainer"]["val_history"] = val_history
            save_checkpoint(session.paths, iteration, session.engine, states, topo.is_main, cfg.checkpoint.keep_last)
        if stop:
            log(f"SIGTERM: saved iteration {iteration} and stopped")
            break
        _test_signal(iteration)
    progress.close()
    session.tracker.finish()
    return {"iteration": iteration, "losses": losses, "skipped_steps": skipped, "preempted": preemption.requested, "validation": val_history}


def _compile_fallback(session: Session) -> str | None:
    """After the first step: a warning where `torch.compile` of the model ran eagerly in part or whole (a compiler
    error, or Dynamo skipping a block's frame without one), which costs speed but not correctness."""
    from toolkit.model.fused import compile_fell_back, describe_compile

    model = session.assembled.model
    if not compile_fell_back(model):
        return None
    return (f"warning: model.config.compile={session.assembled.compile} ran eagerly in part: {describe_compile(model)}; "
            "the step is slower than planned (try model.config.compile=elementwise; TORCH_LOGS=graph_breaks shows why)")


def _format_val(entry: dict) -> str:
    return f"validation at iteration {entry['iteration']}: " + " | ".join(
        f"{k.split('_')[-1]}={v:.4f}" for k, v in entry.items() if k != "iteration"
    )


def _log_values(session: Session, loss, lr, steps, start, step_flops, tokens, skipped) -> dict:
    topo, cfg = session.topology, session.cfg
    if topo.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = max(time.perf_counter() - start, 1e-9)
    seconds_per_step = elapsed / max(steps, 1)
    samples = cfg.dataloader_train.batch_size * topo.dp_size * cfg.trainer.grad_accum_iter
    grad_norm = session.engine.get_global_grad_norm() if hasattr(session.engine, "get_global_grad_norm") else None
    return {
        "loss": loss,
        "grad_norm": float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else None,
        "lr": lr,
        "samples_per_s": samples / seconds_per_step,
        "tokens_per_s_per_gpu": samples * tokens / seconds_per_step / topo.world_size,
        "mfu": mfu(step_flops, seconds_per_step, topo.world_size) if topo.device.type == "cuda" else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(topo.device) / 2**30 if topo.device.type == "cuda" else None,
        "skipped_steps": skipped,
        "seconds_per_step": seconds_per_step,
    }


def _progress(is_main: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not is_main, dynamic_ncols=True, desc="train")
