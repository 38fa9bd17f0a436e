"""LoRA: low-rank adaptation of frozen weights (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685).

A weight W (out x in) is trained as  W' = W + (alpha / r) * B @ A  (paper eq. 3 with the alpha/r
scaling of section 4.1), with A (r x in) random and B (out x r) zero, so W' = W at the start and the
adapted model begins exactly where the pretrained one is. Only A and B are trained.

It is applied as a `torch.nn.utils.parametrize` parametrization of the weight *tensor*, not by
replacing modules, so the same code adapts `nn.Linear.weight` and the fused q/k/v
`nn.MultiheadAttention.in_proj_weight` that open_clip's attention uses (which a Linear-swapping
LoRA cannot reach), and module code and state-dict structure stay open_clip's own. The text tower
(vgen.text.encoder, `text_encoder.mode: lora`) and the generators' adapters (vgen.adaptation,
`adapter: {type: lora}`) both use it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

# Parameter-name suffixes in open_clip's text transformer blocks (resblocks.N.attn / .mlp): the
# attention input (fused q, k, v) and output projections and both MLP layers.
DEFAULT_TARGETS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# A parametrized weight's state-dict keys: OWNER.parametrizations.NAME.original (the base weight)
# and OWNER.parametrizations.NAME.0.lora_A / .lora_B (the factors).
_PARAMETRIZED = ".parametrizations."


class LoRA(nn.Module):
    """The parametrization W -> W + (alpha / rank) * B @ A of one weight matrix."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"LoRA adapts 2-D weights, got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank  # scale: set_lora_scale may change it
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))  # zero: W' = W at init
        # The reference implementation (microsoft/LoRA loralib) initialises A like nn.Linear.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def matches_target(name: str, target: str) -> bool:
    """A target is a glob over the full parameter name when it holds * ? or [, else a suffix."""
    return fnmatch.fnmatchcase(name, target) if any(c in target for c in "*?[") else name.endswith(target)


def _targets_in(module: nn.Module, targets: Iterable[str]) -> list[tuple[nn.Module, str]]:
    """The 2-D weights whose names match a target (convolutions and vectors are left alone)."""
    targets = tuple(targets)
    found = []
    for module_name, sub in module.named_modules():
        for tensor_name, tensor in sub.named_parameters(recurse=False):
            full = f"{module_name}.{tensor_name}" if module_name else tensor_name
            if tensor.ndim == 2 and any(matches_target(full, t) for t in targets) and \
                    not parametrize.is_parametrized(sub, tensor_name):
                found.append((sub, tensor_name))
    return found


def add_lora(
    module: nn.Module, rank: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS
) -> int:
    """Freeze every parameter of `module` and add trainable LoRA factors to the `targets` weights.

    `targets` are suffixes of parameter names (see DEFAULT_TARGETS) or globs over them
    ("*.attn.q.weight"); only 2-D weights are adapted. Returns the number of trainable LoRA parameters.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    found = _targets_in(module, targets)
    if not found:
        raise ValueError(f"no 2-D parameter of {type(module).__name__} matches any of {tuple(targets)}")
    module.requires_grad_(False)
    trainable = 0
    for sub, tensor_name in found:
        lora = LoRA(getattr(sub, tensor_name), rank, alpha)
        parametrize.register_parametrization(sub, tensor_name, lora)
        trainable += lora.lora_A.numel() + lora.lora_B.numel()
    return trainable


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, LoRA) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors of `module`'s state dict (what a LoRA checkpoint needs besides the base)."""
    names = {name for name, m in module.named_modules() if isinstance(m, LoRA)}
    return {
        key: value
        for key, value in module.state_dict().items()
        if key.rsplit(".", 1)[0] in names and key.rsplit(".", 1)[1] in ("lora_A", "lora_B")
    }


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA into its base weight (W <- W + alpha/r * B @ A) and drop the factors.

    The merged weights keep their `requires_grad` (False after `add_lora`). Returns how many weights
    were merged.
    """
    merged = 0
    for sub in list(module.modules()):
        if not parametrize.is_parametrized(sub):
            continue
        for tensor_name in list(sub.parametrizations.keys()):
            if any(isinstance(p, LoRA) for p in sub.parametrizations[tensor_name]):
                parametrize.remove_parametrizations(sub, tensor_name, leave_parametrized=True)
                merged += 1
    return merged


def set_lora_scale(module: nn.Module, factor: float) -> int:
    """Scale every LoRA's update to factor * alpha / rank (0: the base model; 1: as trained), as
    diffusers' `cross_attention_kwargs={"scale": ...}`. Returns how many LoRAs were scaled."""
    loras = [m for m in module.modules() if isinstance(m, LoRA)]
    for lora in loras:
        lora.scale = factor * lora.alpha / lora.rank
    return len(loras)


def merge_lora_tensors(base: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor],
                       scale: float) -> dict[str, torch.Tensor]:
    """The plain state dict of an adapted model from tensors alone: `base` (plain keys) updated by
    `adapted`, a state dict of a model with LoRA parametrizations that holds some of its tensors
    (e.g. only the factors). A factor pair adds scale * B @ A to its base weight (as LoRA.forward);
    any other tensor of `adapted` replaces the base's."""
    merged = dict(base)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapted.items():
        owner, found, rest = key.partition(_PARAMETRIZED)
        if not found:
            merged[key] = value
            continue
        tensor_name, _, tail = rest.partition(".")
        target = f"{owner}.{tensor_name}"
        if tail == "original":
            merged[target] = value
        elif tail.endswith(("lora_A", "lora_B")):
            factors.setdefault(target, {})[tail[-6:]] = value
        else:
            raise ValueError(f"{key}: not a LoRA factor nor a base weight")
    for target, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"} or target not in merged:
            raise ValueError(f"{target}: expected a base weight and both LoRA factors, got {sorted(pair)}")
        merged[target] = merged[target] + scale * (pair["lora_B"] @ pair["lora_A"])
    return merged
