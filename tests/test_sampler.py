"""Samplers against a flow with a known answer: Gaussian data N(m, s^2) is carried to m + s*noise."""

import pytest
import torch

from framepack_local.engine.sampler import rescale_cfg, sample_flow
from framepack_local.engine.schedule import flow_sigmas

M, S = 0.7, 0.3


def gaussian_velocity(x, sigma):
    # x_t = (1-sigma) x0 + sigma eps; v = E[eps - x0 | x_t] for x0 ~ N(M, S^2), eps ~ N(0, 1)
    a = 1.0 - sigma
    var = a * a * S * S + sigma * sigma
    centred = x - a * M
    e_eps = sigma / var * centred
    e_x0 = M + a * S * S / var * centred
    return e_eps - e_x0


@pytest.fixture
def noise():
    return torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_sampler_reaches_exact_answer(noise, sampler):
    out = sample_flow(gaussian_velocity, noise, flow_sigmas(25, 1000), sampler)
    exact = M + S * noise
    assert torch.isfinite(out).all()
    assert (out - exact).abs().max() < (0.03 if sampler == "unipc" else 0.15)


def test_unipc_is_higher_order_than_euler(noise):
    exact = M + S * noise
    err = {s: (sample_flow(gaussian_velocity, noise, flow_sigmas(16, 1000), s) - exact).abs().max().item()
           for s in ("unipc", "euler")}
    assert err["unipc"] < err["euler"] / 3


def test_step_callback_counts(noise):
    seen = []
    sample_flow(gaussian_velocity, noise, flow_sigmas(5, 1000), "unipc", on_step=lambda i, x: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]


def test_rescale_cfg():
    pos = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    guided = pos * 3 + 1
    assert torch.equal(rescale_cfg(guided, pos, 0.0), guided)
    full = rescale_cfg(guided, pos, 1.0)
    assert full.std().item() == pytest.approx(pos.std().item(), rel=1e-5)
    half = rescale_cfg(guided, pos, 0.5)
    assert pos.std() < half.std() < guided.std()
