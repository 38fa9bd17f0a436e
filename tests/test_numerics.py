"""The numerical core against known answers: ODE samplers, guidance, time grids, the learning-rate
schedule, the EMA decay and the sample order."""

from __future__ import annotations

import math

import pytest
import torch

from vgen.diffusion.flow import interpolate, velocity_target
from vgen.diffusion.samplers import classifier_free_guidance, sample_euler, sample_heun, time_grid, truncate_grid
from vgen.randomness import SampleOrder, initial_noise
from vgen.train.ema import ema_decay, make_ema, update_ema
from vgen.train.schedule import learning_rate


def exponential(x, t):
    """dx/dt = x: from x(1) = x1 the exact solution at t = 0 is x1 * e^-1."""
    return x


@pytest.mark.parametrize("steps", [10, 40])
def test_euler_and_heun_converge_at_their_orders(steps):
    x1 = torch.ones(3, dtype=torch.float64)
    exact = math.exp(-1.0)
    ts = time_grid(steps).double()
    euler = sample_euler(exponential, x1, ts)[0].item()
    heun = sample_heun(exponential, x1, ts)[0].item()
    # Euler backwards in t: x <- x (1 - h) per step, so x(0) = (1 - 1/N)^N exactly.
    assert euler == pytest.approx((1 - 1 / steps) ** steps, rel=1e-12)
    # Heun's last step to t = 0 is Euler (Karras et al. 2022, Alg. 1): the other steps are 2nd order.
    h = 1 / steps
    assert heun == pytest.approx((1 - h + h * h / 2) ** (steps - 1) * (1 - h), rel=1e-9)  # grid in fp32
    assert abs(heun - exact) < abs(euler - exact)


def test_euler_errors_halve_with_twice_the_steps():
    x1 = torch.ones(1, dtype=torch.float64)
    errors = [abs(sample_euler(exponential, x1, time_grid(n).double()).item() - math.exp(-1)) for n in (20, 40, 80)]
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.05) and errors[1] / errors[2] == pytest.approx(2, rel=0.03)


def test_a_straight_path_is_integrated_exactly():
    """Rectified flow's point: for the true velocity of a straight path, one Euler step is exact."""
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    v = velocity_target(x0, noise)
    x1 = interpolate(x0, noise, torch.ones(2))
    torch.testing.assert_close(sample_euler(lambda x, t: v, x1, time_grid(1)), x0)
    torch.testing.assert_close(sample_heun(lambda x, t: v, x1, time_grid(7)), x0)


def test_guidance_formula():
    # the pair's first half conditioned (v_c = 3), second unconditioned (v_u = 1): v_u + s (v_c - v_u)
    def pair(x, t):
        half = x.shape[0] // 2
        return torch.cat([torch.full_like(x[:half], 3.0), torch.full_like(x[half:], 1.0)])

    x, t = torch.zeros(2, 1), torch.zeros(2)
    for scale, expected in ((0.0, 1.0), (1.0, 3.0), (2.5, 6.0)):
        assert torch.equal(classifier_free_guidance(pair, scale)(x, t), torch.full((2, 1), expected))


def test_time_grid_and_shift():
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = time_grid(4, shift=3.0)
    # SD3's shift t' = s t / (1 + (s - 1) t): endpoints fixed, t = 0.5 -> 0.75
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2].item() == pytest.approx(0.75)
    assert (shifted[1:-1] > time_grid(4)[1:-1]).all()
    assert truncate_grid(time_grid(4), 0.6).tolist() == pytest.approx([0.6, 0.5, 0.25, 0.0])


def test_learning_rate_schedule():
    lr, total, warmup, floor = 1e-3, 110, 10, 0.1
    assert learning_rate(0, total, lr, warmup, floor) == pytest.approx(1e-4)  # (step + 1) / warmup
    assert learning_rate(9, total, lr, warmup, floor) == pytest.approx(1e-3)
    assert learning_rate(10, total, lr, warmup, floor) == pytest.approx(1e-3)  # cosine starts at the top
    assert learning_rate(60, total, lr, warmup, floor) == pytest.approx(lr * (floor + (1 - floor) * 0.5))
    assert learning_rate(110, total, lr, warmup, floor) == pytest.approx(lr * floor)
    assert learning_rate(500, total, lr, warmup, floor) == pytest.approx(lr * floor)  # past the end: the floor


def test_ema_warmup_and_update():
    assert ema_decay(0, 0.999, True) == pytest.approx(0.1)  # (1 + k) / (10 + k)
    assert ema_decay(90, 0.999, True) == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999, True) == 0.999 and ema_decay(0, 0.999, False) == 0.999
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = make_ema(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    update_ema(ema, model, 0.75)  # lerp toward the weights by 1 - decay
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 0.25)) and not ema.weight.requires_grad


def test_sample_order_is_a_fresh_permutation_each_epoch():
    order = SampleOrder(seed=0, size=7)
    first = [order(g) for g in range(7)]
    second = [order(g) for g in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    again = SampleOrder(seed=0, size=7)
    assert [again(g) for g in (13, 2, 8)] == [second[6], first[2], second[1]]  # any order of asking
    assert [SampleOrder(seed=1, size=7)(g) for g in range(7)] != first


def test_initial_noise_depends_on_the_seed_alone():
    a = initial_noise([5, 6, 7], (2, 3))
    b = initial_noise([7], (2, 3))
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
