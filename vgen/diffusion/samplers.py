"""ODE samplers for the flow dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

Each sampler has the k-diffusion shape `sample_x(denoiser, x, ts)`: `denoiser(x, t) -> v` with t a
[B] tensor, `ts` a decreasing time grid from 1 to 0. They never see a network or a prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """`steps + 1` times from 1 to 0. `shift` > 1 spends more steps near t = 1 (SD3's timestep
    shift, t' = shift * t / (1 + (shift - 1) * t)), which helps at higher resolutions."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Euler's method: x <- x + (t_next - t) * v(x, t)."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = denoiser(x, t.expand(x.shape[0]))
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, arXiv:2206.00364, Algorithm 1): an Euler step,
    then the average of the slopes at both ends; the final step to t = 0 is plain Euler."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = denoiser(x, t.expand(x.shape[0]))
        x_euler = x + (t_next - t) * v
        if t_next > 0:
            v_next = denoiser(x_euler, t_next.expand(x.shape[0]))
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def classifier_free_guidance(model_cond: Denoiser, model_uncond: Denoiser, scale: float) -> Denoiser:
    """Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022): v = v_u + s * (v_c - v_u)."""
    if scale == 1.0:
        return model_cond

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = model_cond(x, t), model_uncond(x, t)
        return v_u + scale * (v_c - v_u)

    return guided
