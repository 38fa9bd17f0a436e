"""Rectified flow / flow matching with a velocity target.

Liu et al., "Flow Straight and Fast" (2022, arXiv:2209.03003); Lipman et al., "Flow Matching for
Generative Modeling" (2022, arXiv:2210.02747); timestep density from Esser et al., "Scaling
Rectified Flow Transformers" (SD3, 2024, arXiv:2403.03206), section 3.1.

Convention: t = 0 is data, t = 1 is noise.
    x_t = (1 - t) * x_0 + t * eps                  (the straight path, eq. 1 of SD3 with a_t = 1 - t, b_t = t)
    v   = d x_t / d t = eps - x_0                  (the velocity the network regresses)
Sampling integrates dx/dt = v from t = 1 down to t = 0.
"""

from __future__ import annotations

import torch


def logit_normal_t(normal: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(mean + std * n) for standard-normal n: SD3's logit-normal density, which spends
    more training on the middle of the path where the velocity is hardest to predict."""
    return torch.sigmoid(mean + std * normal)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared velocity error, shape [B] (the caller reduces over the batch)."""
    return (v_pred.float() - velocity_target(x0, noise).float()).pow(2).flatten(1).mean(1)
