"""The training loss: conditioning splice, velocity form, text dropout, sequence-parallel split, and learning."""

import math

import numpy as np
import torch
from torch import nn

from toolkit.diffusion.conditioning import condition_mask, denoise
from toolkit.diffusion.loss import training_loss, validation_loss
from toolkit.diffusion.schedule import ObjectiveConfig
from toolkit.model import build_dit

T_COND = 1e-4 / (1.0 + 1e-4)


class RecordingNet(nn.Module):
    """A deterministic, differentiable stand-in for the DiT that records what it is called with."""

    compute_dtype = torch.float32

    def __init__(self, conditional_offset: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.conditional_offset = conditional_offset
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, x_B_C_T_H_W, timesteps_B_T, text_B_L_E, mask_B_1_T_H_W):
        output = (
            self.scale * torch.tanh(x_B_C_T_H_W)
            + timesteps_B_T.float()[:, None, :, None, None]
            + text_B_L_E.float().mean(dim=(1, 2))[:, None, None, None, None]
            + self.conditional_offset * mask_B_1_T_H_W  # only changes conditioning frames
        )
        inputs = dict(x=x_B_C_T_H_W, timesteps=timesteps_B_T, text=text_B_L_E, mask=mask_B_1_T_H_W, output=output)
        self.calls.append({name: value.detach().clone() for name, value in inputs.items()})
        return output


def _inputs(batch_size=6, num_frames=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch_size, 16, num_frames, 2, 2, generator=generator)
    text = torch.randn(batch_size, 8, 1024, generator=generator)
    return latent, text


def _replay_draws(seed, batch_size, shape, cfg):
    """The documented draw order, replayed with raw torch calls; sigma computed independently in float64."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(batch_size, generator=generator, dtype=torch.float64)
    choice = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    position = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    high = torch.exp(math.log(cfg.high_sigma_min) + position * math.log(cfg.high_sigma_max / cfg.high_sigma_min))
    sigma = torch.where(choice < cfg.high_sigma_ratio, high, torch.exp(normal) * math.sqrt(shape[2]))
    low, high = cfg.min_num_conditional_frames, cfg.max_num_conditional_frames
    num_cond = torch.randint(low, high + 1, (batch_size,), generator=generator)
    dropped = torch.rand(batch_size, generator=generator) < cfg.text_dropout
    noise = torch.randn(shape, generator=generator)
    return sigma.float().double(), num_cond, dropped, noise.double()


def test_denoise_splices_clean_latent_and_conditional_time():
    latent, text = _inputs(batch_size=2)
    sigma_B = torch.tensor([0.7, 30.0])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    x_sigma = latent + sigma_B[:, None, None, None, None] * noise
    mask = condition_mask(torch.tensor([1, 2]), (2, 1, 4, 2, 2))
    net = RecordingNet()
    x0_pred = denoise(net, x_sigma, sigma_B, latent, mask, text, ObjectiveConfig())
    call = net.calls[0]
    conditional = mask.expand_as(latent).bool()
    t64 = sigma_B.double() / (1 + sigma_B.double())
    t_5d = t64[:, None, None, None, None]
    # network input: exact clean latent on conditioning frames, (1 - t) x_sigma elsewhere
    assert torch.equal(call["x"][conditional], latent[conditional])
    scaled = (1 - t_5d) * x_sigma.double()
    np.testing.assert_allclose(call["x"][~conditional], scaled[~conditional], rtol=1e-6)
    # timesteps: 1e-4 / (1 + 1e-4) on conditioning frames, sigma / (1 + sigma) elsewhere
    conditional_B_T = mask[:, 0, :, 0, 0].bool()
    expected_t = torch.where(conditional_B_T, torch.full((2, 4), T_COND, dtype=torch.float64), t64[:, None].expand(2, 4))
    np.testing.assert_allclose(call["timesteps"].double(), expected_t, rtol=1e-6)
    assert torch.equal(call["mask"], mask)
    # output: exact clean latent on conditioning frames, (1 - t) x_sigma - t F elsewhere
    assert x0_pred.dtype == torch.float32
    assert torch.equal(x0_pred[conditional], latent[conditional])
    expected_x0 = (1 - t_5d) * x_sigma.double() - t_5d * call["output"].double()
    np.testing.assert_allclose(x0_pred.detach()[~conditional], expected_x0[~conditional], rtol=1e-5, atol=1e-6)


def test_timesteps_follow_the_network_compute_dtype():
    class Bf16Net(RecordingNet):
        compute_dtype = torch.bfloat16

    latent, text = _inputs(batch_size=2)
    net = Bf16Net()
    mask = condition_mask(torch.tensor([1, 1]), (2, 1, 4, 2, 2))
    sigma_B = torch.tensor([0.3, 3.0])
    out = denoise(net, latent, sigma_B, latent, mask, text.bfloat16(), ObjectiveConfig())
    timesteps = net.calls[0]["timesteps"]
    assert timesteps.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert timesteps[0, 0].item() == torch.tensor(T_COND, dtype=torch.float32).bfloat16().item()
    assert timesteps[1, 1].item() == torch.tensor(3.0 / 4.0).bfloat16().item()


def test_training_loss_equals_x0_and_velocity_forms():
    cfg = ObjectiveConfig(high_sigma_ratio=0.3)
    latent, text = _inputs(batch_size=8)
    net = RecordingNet()
    loss, info = training_loss(net, latent, text, cfg, torch.Generator().manual_seed(3))
    sigma, num_cond, dropped, noise = _replay_draws(3, 8, latent.shape, cfg)
    assert torch.equal(info.num_conditional_frames_B, num_cond) and torch.equal(info.text_dropped_B, dropped)
    np.testing.assert_allclose(info.sigma_B.double(), sigma, rtol=1e-6)
    assert set(num_cond.tolist()) == {1, 2} and (sigma > 200).any()  # the draw covers both cases

    # float64 reference from the recorded network output F
    F = net.calls[0]["output"].double()
    x0 = latent.double()
    s = sigma[:, None, None, None, None]
    t = s / (1 + s)
    generated = (torch.arange(4)[None, :] >= num_cond[:, None]).double()[:, None, :, None, None].expand_as(x0)
    x0_pred = torch.where(generated.bool(), (1 - t) * (x0 + s * noise) - t * F, x0)
    weight = (1 + s) ** 2 / s**2
    x0_form = 10 * (weight * (x0 - x0_pred) ** 2).mean()
    velocity_form = 10 * (generated * (F - (noise - x0)) ** 2).mean()
    np.testing.assert_allclose(loss.item(), x0_form.item(), rtol=1e-5)
    np.testing.assert_allclose(loss.item(), velocity_form.item(), rtol=1e-5)
    per_sample = 10 * (generated * (F - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    np.testing.assert_allclose(info.loss_per_sample_B.double(), per_sample, rtol=1e-5)
    loss.backward()
    assert net.scale.grad is not None and net.scale.grad.abs() > 0


def test_conditioning_frames_contribute_zero_loss():
    latent, text = _inputs()
    cfg = ObjectiveConfig()
    plain = training_loss(RecordingNet(), latent, text, cfg, torch.Generator().manual_seed(5))[0]
    # the network output on conditioning frames is shifted by 1e3: the loss must not move at all
    shifted_net = RecordingNet(conditional_offset=1e3)
    shifted, info = training_loss(shifted_net, latent, text, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(plain, shifted)
    assert info.num_conditional_frames_B.min() >= 1
    call = shifted_net.calls[0]
    conditional = call["mask"].expand_as(latent).bool()
    assert torch.equal(call["x"][conditional], latent[conditional])
    frame_conditional = call["mask"][:, 0, :, 0, 0].bool()
    conditional_times = call["timesteps"][frame_conditional]
    torch.testing.assert_close(conditional_times, torch.full_like(conditional_times, T_COND))


def test_text_dropout_zeroes_whole_embeddings():
    latent, text = _inputs(batch_size=16)
    net = RecordingNet()
    _, info = training_loss(net, latent, text, ObjectiveConfig(), torch.Generator().manual_seed(0))
    seen = net.calls[0]["text"]
    dropped = info.text_dropped_B
    assert 0 < dropped.sum() < 16  # the seed exercises both branches
    assert torch.equal(seen[dropped], torch.zeros_like(seen[dropped]))
    assert torch.equal(seen[~dropped], text[~dropped])
    for rate, expected in ((0.0, text), (1.0, torch.zeros_like(text))):
        net = RecordingNet()
        training_loss(net, latent, text, ObjectiveConfig(text_dropout=rate), torch.Generator().manual_seed(0))
        assert torch.equal(net.calls[0]["text"], expected)


class ShardNet(RecordingNet):
    """Returns chunk `rank` of 2 of its output along T, as a sequence-parallel DiT does."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, *args):
        return super().forward(*args).chunk(2, dim=2)[self.rank]


def test_split_loss_mean_equals_unsplit_loss():
    latent, text = _inputs(batch_size=4, num_frames=6)
    cfg = ObjectiveConfig(high_sigma_ratio=0.2)
    full, _ = training_loss(RecordingNet(), latent, text, cfg, torch.Generator().manual_seed(9))
    shard_losses = []
    for rank in range(2):
        split_fn = lambda tensor, dim, rank=rank: tensor.chunk(2, dim=dim)[rank]  # noqa: E731
        loss, info = training_loss(ShardNet(rank), latent, text, cfg, torch.Generator().manual_seed(9), split_fn)
        shard_losses.append(loss)
        assert info.loss_per_sample_B.shape == (4,)
    assert not torch.equal(shard_losses[0], shard_losses[1])
    torch.testing.assert_close((shard_losses[0] + shard_losses[1]) / 2, full, rtol=1e-6, atol=0)


def test_validation_loss_at_fixed_sigmas():
    latent, text = _inputs(batch_size=2)
    cfg = ObjectiveConfig()
    net = RecordingNet()
    losses = validation_loss(net, latent, text, [0.5, 20.0], cfg, torch.Generator().manual_seed(4))
    assert list(losses) == [0.5, 20.0]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4)).double()
    x0 = latent.double()
    generated = torch.ones_like(x0)
    generated[:, :, 0] = 0  # one conditioning frame
    for call, sigma in zip(net.calls, losses):
        assert torch.equal(call["text"], text)  # no dropout
        F = call["output"].double()
        expected = 10 * (generated * (F - (noise - x0)) ** 2).mean()
        np.testing.assert_allclose(losses[sigma], expected.item(), rtol=1e-5)


def test_tiny_dit_learns_a_fixed_clip():
    torch.manual_seed(0)
    net = build_dit("tiny")
    data = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 3, 8, 8, generator=data).expand(2, -1, -1, -1, -1).contiguous()
    text = 0.1 * torch.randn(1, 512, 1024, generator=data).expand(2, -1, -1).contiguous()
    cfg = ObjectiveConfig()
    sigmas = [0.5, 5.0, 50.0]
    before = validation_loss(net, latent, text, sigmas, cfg, torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(300):
        loss, _ = training_loss(net, latent, text, cfg, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = validation_loss(net, latent, text, sigmas, cfg, torch.Generator().manual_seed(2))
    # the untrained net's loss is ~10-15 (F ~ 0 gives about 10 * E|eps - x0|^2 on generated frames)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    for sigma in sigmas:  # same noise, same frames: only the weights changed
        assert after[sigma] < 0.5 * before[sigma]
