"""Writing captions with a captioner's decoder: greedy, beam search, or sampling.

All three run the decoder with its key/value cache (vgen.models.ar.TokenTransformer), one byte a
step, for a batch of images at once. Sampling draws each image's bytes from its own generator
(seeded by the image's seed), so an image's caption does not depend on the batch it is written in.
"""

from __future__ import annotations

import torch

from vgen.models.captioner import END, VOCAB, ImageContext


def _finished(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens == END).any(dim=1)


def _write(network, context: ImageContext, max_tokens: int, choose) -> torch.Tensor:
    """One byte a step, `choose(logits [B, VOCAB]) -> tokens [B]`, until every row has written END
    (a finished row keeps writing END) or max_tokens: tokens [B, <= max_tokens]."""
    logits, state = network.start_decoding(context)
    written = []
    for _ in range(max_tokens):
        token = choose(logits.float())
        if written:
            token = torch.where(_finished(torch.stack(written, 1)), torch.full_like(token, END), token)
        written.append(token)
        if _finished(torch.stack(written, 1)).all():
            break
        logits = network.next_logits(token, state)
    return torch.stack(written, 1)


@torch.no_grad()
def greedy(network, context: ImageContext, max_tokens: int) -> torch.Tensor:
    """The most probable byte at every step: tokens [B, <= max_tokens] (END-terminated rows)."""
    return _write(network, context, max_tokens, lambda logits: logits.argmax(dim=-1))


@torch.no_grad()
def sample(network, context: ImageContext, max_tokens: int, seeds: list[int], temperature: float) -> torch.Tensor:
    """Bytes drawn from softmax(logits / temperature), image i's from a generator seeded by seeds[i]."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probabilities = (logits / temperature).softmax(dim=-1).cpu()
        drawn = [torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probabilities, generators)]
        return torch.stack(drawn).to(logits.device)

    return _write(network, context, max_tokens, choose)


@torch.no_grad()
def beam_search(network, context: ImageContext, max_tokens: int, beams: int, use_cache: bool = True) -> torch.Tensor:
    """Beam search (as in captioning since Vinyals et al. 2015): keep the `beams` best unfinished
    captions of each image by summed log-probability; one that writes END is set aside. The answer
    is the finished caption of highest mean log-probability per token (END included: a length
    normalisation, so that short captions are not favoured merely for being short); an image with
    no finished caption after max_tokens gets its best unfinished one."""
    B = context.tokens.shape[0]
    expanded = ImageContext(*(t.repeat_interleave(beams, dim=0) if torch.is_tensor(t) else t for t in context))
    logits, state = network.start_decoding(expanded, use_cache=use_cache)
    device = logits.device
    scores = torch.zeros(B, beams, device=device)
    scores[:, 1:] = float("-inf")  # every beam starts equal: only the first one expands at step 0
    history = torch.zeros(B, beams, 0, dtype=torch.long, device=device)
    best: list[tuple[float, list[int]] | None] = [None] * B
    for step in range(max_tokens):
        log_probs = logits.float().log_softmax(dim=-1).view(B, beams, VOCAB)
        total = (scores[:, :, None] + log_probs).view(B, -1)  # [B, beams * VOCAB]
        top, flat = total.topk(2 * beams, dim=-1)  # enough to keep `beams` unfinished ones
        source, token = flat // VOCAB, flat % VOCAB
        new_scores = torch.full((B, beams), float("-inf"), device=device)
        rows = torch.zeros(B, beams, dtype=torch.long, device=device)
        tokens = torch.full((B, beams), END, dtype=torch.long, device=device)
        for b in range(B):
            kept = 0
            for j in range(2 * beams):
                score, src, tok = top[b, j].item(), int(source[b, j]), int(token[b, j])
                if score == float("-inf"):
                    break
                if tok == END:
                    caption = history[b, src].tolist()
                    normalised = score / (len(caption) + 1)
                    if best[b] is None or normalised > best[b][0]:
                        best[b] = (normalised, caption)
                elif kept < beams:  # in order of score: beam 0 is the best unfinished one
                    new_scores[b, kept], rows[b, kept], tokens[b, kept] = score, src, tok
                    kept += 1
        if torch.isinf(new_scores).all():  # every beam of every image has ended
            break
        flat_rows = (rows + torch.arange(B, device=device)[:, None] * beams).flatten()
        network.reorder(state, flat_rows)
        history = torch.cat([history.view(B * beams, -1)[flat_rows].view(B, beams, -1), tokens[:, :, None]], dim=2)
        scores = new_scores
        if step == max_tokens - 1:
            break
        logits = network.next_logits(tokens.flatten(), state)
    out = torch.full((B, max_tokens + 1), END, dtype=torch.long)
    for b, found in enumerate(best):
        caption = found[1] if found is not None else history[b, 0].tolist()
        out[b, :len(caption)] = torch.tensor(caption, dtype=torch.long)
    return out
