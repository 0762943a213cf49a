"""Guidance tempering in the embedded UNet's pretraining (embedded/train_unet.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from embedded.models import make_train_scheduler, make_unet
from embedded.train_unet import LatentCache, diffusion_loss, tempered_targets, train_unet

ROWS = 8


@pytest.fixture
def cache() -> LatentCache:
    """Two concepts with distinct latents and captions; text state 0 is the empty caption."""
    generator = torch.Generator().manual_seed(0)
    unet = make_unet()
    text_width = unet.config.cross_attention_dim
    size = unet.config.sample_size
    concept = torch.arange(ROWS) % 2
    mean = torch.where(concept.view(-1, 1, 1, 1) == 0, 1.0, -1.0) * torch.ones(ROWS, 4, size, size)
    text_states = torch.randn(3, 5, text_width, generator=generator)
    text_states[0] = 0.0
    return LatentCache(
        mean=mean,
        std=torch.full_like(mean, 0.05),
        caption_index=(concept + 1).view(-1, 1),
        text_states=text_states,
        scaling_factor=1.0,
    )


class SpyUNet(torch.nn.Module):
    """A UNet that records the text states of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = make_unet()
        self.calls: list[torch.Tensor] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        self.calls.append(encoder_hidden_states.detach().clone())
        return self.unet(sample, timestep, encoder_hidden_states)


def test_tempered_targets_replace_only_the_chosen_rows_and_carry_no_gradient():
    noise = torch.randn(4, 4, 8, 8)
    weight = torch.ones((), requires_grad=True)
    asked = []

    def unconditional(rows: torch.Tensor) -> torch.Tensor:
        asked.append(rows.tolist())
        return weight * torch.full((len(rows), 4, 8, 8), 7.0)

    targets = tempered_targets(noise, unconditional, torch.tensor([False, True, False, True]))
    assert asked == [[1, 3]]
    assert torch.equal(targets[[0, 2]], noise[[0, 2]])
    assert torch.all(targets[[1, 3]] == 7.0)
    assert not targets.requires_grad


def test_no_tempered_row_leaves_the_noise_and_skips_the_extra_pass():
    noise = torch.randn(3, 4, 8, 8)

    def unconditional(rows: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no row was tempered, so no unconditional pass is needed")

    assert tempered_targets(noise, unconditional, torch.zeros(3, dtype=torch.bool)) is noise


@pytest.mark.parametrize("share, passes", [(0.0, 1), (1.0, 2)])
def test_tempered_loss_asks_the_unet_for_its_unconditional_prediction_first(cache, share, passes):
    spy = SpyUNet()
    batch = torch.arange(ROWS)
    diffusion_loss(spy, make_train_scheduler(), cache, batch, torch.Generator().manual_seed(1), temper_share=share)
    assert len(spy.calls) == passes
    assert len(spy.calls[-1]) == ROWS  # the trained pass sees the whole batch
    if passes == 2:
        empty = cache.text_states[0]
        assert 0 < len(spy.calls[0]) <= ROWS  # the captioned rows (caption dropout spares some)
        assert all(torch.equal(states, empty) for states in spy.calls[0])


def guidance_gap(unet: torch.nn.Module, scheduler: DDPMScheduler, cache: LatentCache) -> float:
    """Mean |eps_c - eps_u| on fixed noisy latents of both concepts: what guidance scales up."""
    generator = torch.Generator().manual_seed(99)
    timesteps = torch.full((ROWS,), 500)
    noisy = scheduler.add_noise(cache.mean, torch.randn(cache.mean.shape, generator=generator), timesteps)
    with torch.no_grad():
        conditional = unet(noisy, timesteps, cache.text_states[cache.caption_index[:, 0]]).sample
        unconditional = unet(noisy, timesteps, cache.text_states[[0] * ROWS]).sample
    return (conditional - unconditional).abs().mean().item()


def test_tempering_narrows_the_gap_that_guidance_scales(cache):
    scheduler = make_train_scheduler()
    gaps = {}
    for share in (0.0, 1.0):
        unet = make_unet()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(2)
        for _ in range(30):
            batch = torch.randint(ROWS, (16,), generator=generator)
            loss = diffusion_loss(unet, scheduler, cache, batch, generator, temper_share=share)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        gaps[share] = guidance_gap(unet, scheduler, cache)
    assert gaps[1.0] < 0.5 * gaps[0.0], gaps


def test_train_unet_tempers_only_its_later_steps_and_logs_when(cache, monkeypatch):
    shares = []
    original = diffusion_loss

    def recording_loss(*args, **kwargs):
        shares.append(args[5] if len(args) > 5 else kwargs.get("temper_share", 0.0))
        return original(*args, **kwargs)

    monkeypatch.setattr("embedded.train_unet.diffusion_loss", recording_loss)
    monkeypatch.setattr("embedded.train_unet.TEMPER_FROM", 0.5)
    monkeypatch.setattr("embedded.train_unet.TEMPER_SHARE", 0.25)
    _, log = train_unet(make_unet(), make_train_scheduler(), cache, steps=4, batch_size=4)
    assert shares == [0.0, 0.0, 0.25, 0.25]
    assert log["temper_from_step"] == 2
    assert log["temper_share"] == 0.25
