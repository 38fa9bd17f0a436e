"""Drawing image tokens from the autoregressive family's transformer (vgen.models.ar), as functions
of tensors: temperature, top-k and top-p (nucleus, Holtzman et al. 2020, arXiv:1904.09751)
filtering, classifier-free guidance on the logits (as LlamaGen's), and the decoding loop.

Every image's randomness comes from its own seed: token k of image i is drawn with the Gumbel-max
trick from uniforms of a generator seeded by seeds[i] alone, so an image does not depend on the
batch it is drawn in.
"""

from __future__ import annotations

import contextlib

import torch

from vgen.randomness import STREAM_TOKENS, generator


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] / temperature, with -inf outside the top_k highest (0: all) and outside the
    smallest set of highest-probability tokens whose mass reaches top_p (1: all)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:  # exactly k tokens, ties broken by topk's order
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))  # the first token has 0 before it: always kept
    return logits


def guided_logits(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance on logits [2B, V] (conditioned half first): u + g (c - u)."""
    cond, uncond = logits.float().chunk(2)
    return uncond + guidance * (cond - uncond)


def gumbel_choice(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """argmax(logits + Gumbel noise): a sample of softmax(logits) per row (Gumbel 1954; the -inf of
    filtered tokens never win). uniforms [B, V] in [0, 1)."""
    gumbel = -torch.log(-torch.log(uniforms.clamp(1e-20, 1 - 1e-7)))
    return (logits + gumbel.to(logits.device)).argmax(dim=-1)


@torch.no_grad()
def sample_tokens(network, cond, uncond, seeds: list[int], count: int, *, guidance: float, temperature: float,
                  top_k: int = 0, top_p: float = 1.0, use_cache: bool = True,
                  autocast=contextlib.nullcontext) -> torch.Tensor:
    """Token ids [B, count] for caption features `cond` (and the guidance's `uncond`, used only when
    guidance != 1), image i from seeds[i]."""
    guided = guidance != 1.0
    text = type(cond)(*(torch.cat([c, u]) for c, u in zip(cond, uncond))) if guided else cond
    rngs = [generator(seed, STREAM_TOKENS) for seed in seeds]
    vocab = network.codebook_size
    with autocast():
        logits, state = network.start_decoding(text, use_cache)
    tokens = []
    for k in range(count):
        step_logits = guided_logits(logits, guidance) if guided else logits.float()
        uniforms = torch.stack([torch.rand(vocab, generator=g) for g in rngs])
        token = gumbel_choice(filter_logits(step_logits, temperature, top_k, top_p), uniforms)
        tokens.append(token)
        if k + 1 < count:
            with autocast():
                logits = network.next_logits(torch.cat([token, token]) if guided else token, state)
    return torch.stack(tokens, dim=1)
