"""ODE samplers for the flow dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

Each sampler has the k-diffusion shape `sample_x(denoiser, x, ts)`: `denoiser(x, t) -> v` with t a
[B] tensor, `ts` a decreasing time grid ending at 0. They never see a network or a prompt.
`after_step(x, t_next) -> x`, when given, rewrites the state after every step (inpainting puts the
known pixels back there); it is the samplers' only hook.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AfterStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """`steps + 1` times from 1 to 0. `shift` > 1 spends more steps near t = 1 (SD3's timestep
    shift, t' = shift * t / (1 + (shift - 1) * t)), which helps at higher resolutions."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)


def truncate_grid(ts: torch.Tensor, t_start: float) -> torch.Tensor:
    """The part of grid `ts` below `t_start`, starting at `t_start` itself: the steps left to take
    from a state at time `t_start` (SDEdit's start). `t_start = 1` gives the whole grid back, and
    the number of steps taken is about `t_start` times the grid's, as in img2img of diffusers."""
    below = ts[ts < t_start]
    return torch.cat([ts.new_tensor([t_start]), below])


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor,
                 after_step: AfterStep | None = None) -> torch.Tensor:
    """Euler's method: x <- x + (t_next - t) * v(x, t)."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = denoiser(x, t.expand(x.shape[0]))
        x = x + (t_next - t) * v
        if after_step is not None:
            x = after_step(x, t_next)
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor,
                after_step: AfterStep | None = None) -> torch.Tensor:
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
        if after_step is not None:
            x = after_step(x, t_next)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def classifier_free_guidance(denoiser_pair: Denoiser, scale: float) -> Denoiser:
    """Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022, arXiv:2207.12598):
    v = v_u + s * (v_c - v_u).

    `denoiser_pair` gets the batch twice, [x; x], and must condition its first half and leave the
    second unconditioned (or negative-prompted): both predictions come from one network call,
    which keeps the network's batches large (on a GPU, twice the batch costs far less than two calls).
    """

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = denoiser_pair(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_u + scale * (v_c - v_u)

    return guided
