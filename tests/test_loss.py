"""The diffusion loss on tiny hand-made tensors, against hand computations written out with plain torch ops.

Every expected value is built here from the scheduler's `alphas_cumprod` (SNR = a / (1 - a)) or from the
raw draws of a seeded generator; the functions under test are called once per case, never used as their own
reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from lorakit.config import ConfigError, TrainingArgs
from lorakit.training import diffusion_loss, diffusion_target, training_loss

GAMMA = 5.0
# SNR at these timesteps of the SD schedule: ~1.4e2 (clipped to gamma), ~0.3 and ~0.005 (not clipped), so
# the clipped and unclipped branches and the epsilon/v weightings all give clearly different numbers.
TIMESTEPS = torch.tensor([10, 500, 999])


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The Stable Diffusion training schedule, as the tiny pipeline of conftest has it."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
    )


def alphas_at(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at `timesteps`, in float64 for the hand computations."""
    return scheduler.alphas_cumprod[timesteps].double()


def hand_snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_at(scheduler, timesteps)
    return a / (1.0 - a)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of squared errors over every element of each sample, by hand: sum / count."""
    squared = (pred.double() - target.double()) ** 2
    return squared.reshape(squared.shape[0], -1).sum(dim=1) / squared[0].numel()


@pytest.fixture
def pred_and_target() -> tuple[torch.Tensor, torch.Tensor]:
    """Three samples of shape (4, 2, 2) whose errors differ in size, so per-sample weights matter."""
    generator = torch.Generator().manual_seed(1234)
    target = torch.randn((3, 4, 2, 2), generator=generator)
    scale = torch.tensor([0.5, 1.0, 3.0]).reshape(3, 1, 1, 1)
    pred = target + scale * torch.randn((3, 4, 2, 2), generator=generator)
    return pred, target


def test_sd_schedule_is_scaled_linear_and_the_chosen_timesteps_straddle_gamma():
    scheduler = sd_scheduler()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(scheduler.alphas_cumprod.double(), torch.cumprod(1.0 - betas, dim=0), rtol=1e-5)
    snr = hand_snr(scheduler, TIMESTEPS)
    assert snr[0] > GAMMA > 1.0 > snr[1] > snr[2]  # one clipped weight, two unclipped ones


def test_plain_mse_without_weighting_on_literal_numbers():
    # Prediction zero, target constant 1, 2 and 3 in the three samples: squared errors 1, 4, 9 everywhere.
    target = torch.stack([torch.full((4, 2, 2), value) for value in (1.0, 2.0, 3.0)])
    pred = torch.zeros_like(target)
    loss = diffusion_loss(pred, target, TIMESTEPS, sd_scheduler(), snr_gamma=None)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx((1.0 + 4.0 + 9.0) / 3, rel=1e-6)


def test_plain_mse_ignores_timesteps_and_prediction_type(pred_and_target):
    pred, target = pred_and_target
    expected = per_sample_mse(pred, target).mean()
    for prediction_type in ("epsilon", "v_prediction"):
        for timesteps in (TIMESTEPS, torch.tensor([0, 0, 0])):
            loss = diffusion_loss(pred, target, timesteps, sd_scheduler(prediction_type), snr_gamma=None)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_half_precision_inputs_give_a_float32_loss(pred_and_target):
    pred, target = pred_and_target
    loss = diffusion_loss(pred.half(), target.half(), TIMESTEPS, sd_scheduler(), snr_gamma=None)
    assert loss.dtype == torch.float32
    expected = per_sample_mse(pred.half().float(), target.half().float()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_min_snr_weights_for_epsilon_prediction(pred_and_target):
    pred, target = pred_and_target
    scheduler = sd_scheduler("epsilon")
    snr = hand_snr(scheduler, TIMESTEPS)
    weights = torch.minimum(snr, torch.full_like(snr, GAMMA)) / snr
    expected = (per_sample_mse(pred, target) * weights).sum() / 3
    loss = diffusion_loss(pred, target, TIMESTEPS, scheduler, snr_gamma=GAMMA)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The weighting must actually bite here: against the unweighted loss and the v-prediction weights.
    unweighted = per_sample_mse(pred, target).mean()
    v_weights = torch.minimum(snr, torch.full_like(snr, GAMMA)) / (snr + 1)
    assert loss.item() != pytest.approx(unweighted.item(), rel=1e-2)
    assert loss.item() != pytest.approx((per_sample_mse(pred, target) * v_weights).mean().item(), rel=1e-2)


def test_min_snr_weights_for_v_prediction(pred_and_target):
    pred, target = pred_and_target
    scheduler = sd_scheduler("v_prediction")
    snr = hand_snr(scheduler, TIMESTEPS)
    weights = torch.minimum(snr, torch.full_like(snr, GAMMA)) / (snr + 1.0)
    expected = (per_sample_mse(pred, target) * weights).sum() / 3
    loss = diffusion_loss(pred, target, TIMESTEPS, scheduler, snr_gamma=GAMMA)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    eps_weights = torch.minimum(snr, torch.full_like(snr, GAMMA)) / snr
    assert loss.item() != pytest.approx((per_sample_mse(pred, target) * eps_weights).mean().item(), rel=1e-2)


def test_min_snr_weight_is_one_for_epsilon_when_every_snr_is_below_gamma(pred_and_target):
    pred, target = pred_and_target
    timesteps = torch.tensor([600, 800, 999])
    assert (hand_snr(sd_scheduler(), timesteps) < GAMMA).all()
    loss = diffusion_loss(pred, target, timesteps, sd_scheduler("epsilon"), snr_gamma=GAMMA)
    assert loss.item() == pytest.approx(per_sample_mse(pred, target).mean().item(), rel=1e-5)


def test_min_snr_weights_each_sample_by_its_own_timestep(pred_and_target):
    """Swapping the timesteps of two samples changes the loss: weights are per sample, not one average."""
    pred, target = pred_and_target
    scheduler = sd_scheduler("epsilon")
    swapped = TIMESTEPS[[2, 1, 0]]
    snr = hand_snr(scheduler, swapped)
    expected = (per_sample_mse(pred, target) * torch.minimum(snr, torch.full_like(snr, GAMMA)) / snr).mean()
    loss = diffusion_loss(pred, target, swapped, scheduler, snr_gamma=GAMMA)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    original = diffusion_loss(pred, target, TIMESTEPS, scheduler, snr_gamma=GAMMA)
    assert loss.item() != pytest.approx(original.item(), rel=1e-2)


def test_epsilon_target_is_the_noise():
    generator = torch.Generator().manual_seed(7)
    latents, noise = torch.randn((2, 4, 2, 2), generator=generator), torch.randn((2, 4, 2, 2), generator=generator)
    target = diffusion_target(sd_scheduler("epsilon"), latents, noise, torch.tensor([3, 900]))
    assert torch.equal(target, noise)


def test_v_prediction_target_is_the_velocity():
    generator = torch.Generator().manual_seed(7)
    latents, noise = torch.randn((2, 4, 2, 2), generator=generator), torch.randn((2, 4, 2, 2), generator=generator)
    timesteps = torch.tensor([3, 900])
    scheduler = sd_scheduler("v_prediction")
    a = alphas_at(scheduler, timesteps).reshape(2, 1, 1, 1)
    expected = a.sqrt() * noise.double() - (1.0 - a).sqrt() * latents.double()
    target = diffusion_target(scheduler, latents, noise, timesteps)
    assert target.shape == latents.shape
    assert torch.allclose(target.double(), expected, rtol=1e-5, atol=1e-6)
    # At t=3 the velocity is almost the noise, at t=900 mostly minus the latents: not the epsilon target.
    assert not torch.allclose(target, noise, atol=1e-2)


def test_unsupported_prediction_type_is_a_config_error():
    scheduler = sd_scheduler("sample")
    zeros = torch.zeros((2, 4, 2, 2))
    with pytest.raises(ConfigError, match="'sample'"):
        diffusion_target(scheduler, zeros, zeros, torch.tensor([1, 2]))


class RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: predicts zero and keeps what it was given."""

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        self.seen = (sample.clone(), timestep.clone())
        return (torch.zeros_like(sample),)


def run_training_loss(noise_offset: float, seed: int = 99) -> tuple[torch.Tensor, RecordingUNet, dict]:
    """`training_loss` on cached latent moments (mean `mean`, log-variance 0) with a recording UNet."""
    mean = torch.arange(3 * 4 * 2 * 2, dtype=torch.float32).reshape(3, 4, 2, 2) / 10
    batch = {
        "latent_moments": torch.cat([mean, torch.zeros_like(mean)], dim=1),  # std 1: every draw shows
        "encoder_hidden_states": torch.zeros((3, 5, 16)),
    }
    vae = SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(scaling_factor=0.5, shift_factor=None))
    unet = RecordingUNet()
    models = SimpleNamespace(vae=vae, noise_scheduler=sd_scheduler("epsilon"))
    training = TrainingArgs(noise_offset=noise_offset, report_to="none")
    loss = training_loss(models, unet, None, batch, training, torch.Generator().manual_seed(seed))
    return loss, unet, {"mean": mean}


def hand_draws(mean: torch.Tensor, noise_offset: float, seed: int = 99) -> dict[str, torch.Tensor]:
    """The draws of one step, in the trainer's order: posterior sample, noise, offset (if any), timesteps."""
    generator = torch.Generator().manual_seed(seed)
    latents = (mean + torch.randn(mean.shape, generator=generator)) * 0.5
    base_noise = torch.randn(mean.shape, generator=generator)
    offset = torch.zeros(3, 4, 1, 1)
    if noise_offset:
        offset = noise_offset * torch.randn((3, 4, 1, 1), generator=generator)
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    return {"latents": latents, "base_noise": base_noise, "noise": base_noise + offset, "timesteps": timesteps}


@pytest.mark.parametrize("noise_offset", [0.0, 0.1])
def test_training_loss_draws_noise_with_the_per_channel_offset(noise_offset):
    loss, unet, inputs = run_training_loss(noise_offset)
    draws = hand_draws(inputs["mean"], noise_offset)
    noisy, timesteps = unet.seen
    assert torch.equal(timesteps, draws["timesteps"])
    a = alphas_at(sd_scheduler(), draws["timesteps"]).reshape(3, 1, 1, 1)
    expected_noisy = a.sqrt() * draws["latents"].double() + (1.0 - a).sqrt() * draws["noise"].double()
    assert torch.allclose(noisy.double(), expected_noisy, rtol=1e-5, atol=1e-5)
    # Zero prediction against the epsilon target: the loss is the mean square of the noise actually used.
    assert loss.item() == pytest.approx((draws["noise"].double() ** 2).mean().item(), rel=1e-5)


def test_noise_offset_is_one_constant_per_sample_and_channel():
    _, unet, inputs = run_training_loss(0.1)
    draws = hand_draws(inputs["mean"], 0.1)
    a = alphas_at(sd_scheduler(), draws["timesteps"]).reshape(3, 1, 1, 1)
    # Recover the noise the function used from what it fed the UNet, then take away the plain noise draw.
    used_noise = (unet.seen[0].double() - a.sqrt() * draws["latents"].double()) / (1.0 - a).sqrt()
    extra = used_noise - draws["base_noise"].double()
    assert torch.allclose(extra, extra[:, :, :1, :1].expand_as(extra), atol=1e-4)  # constant over H and W
    per_channel = extra[:, :, 0, 0]
    assert per_channel.abs().min() > 1e-4  # present in every channel of every sample
    assert per_channel.abs().max() < 0.1 * 5  # and of the scale noise_offset sets (0.1 x a standard normal)
    assert len({round(v, 3) for v in per_channel.flatten().tolist()}) == 12  # its own draw per (sample, channel)
