"""Token generation of an ar run with and without the key/value cache, side by side in one process:
the same prompts, seeds and sampler settings (the run's defaults), images/s of each way, their
ratio, and whether they wrote the same tokens.

Without the cache every new token runs the transformer over the whole sequence so far (the caption
prefix and every token before it); with it, the prefix runs once and each token is one position.
The two take turns in each repeat; the best time of each counts. Decoding the tokens to pixels is
the same for both and is left out.

    python bench/ar_kv_cache.py demo/ar
    python bench/ar_kv_cache.py demo/ar --images 64 --repeats 3 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from vgen.data.emoji_scenes import benchmark_prompts
from vgen.families.ar_sampling import sample_tokens
from vgen.generate import GenerationRequest
from vgen.runs import load_run


def draw(gen, request: GenerationRequest, prompts: list[str], use_cache: bool) -> tuple[float, torch.Tensor]:
    """Seconds to write the tokens of len(prompts) images in batches, and the tokens."""
    family, model, out = gen.family, gen.model, []
    seeds = list(range(len(prompts)))
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    start = time.perf_counter()
    for first in range(0, len(prompts), request.batch_size):
        batch = slice(first, first + request.batch_size)
        cond = model.encode_text(prompts[batch])
        uncond = model.encode_text([request.negative_prompt] * len(prompts[batch]))
        out.append(sample_tokens(model.network, cond, uncond, seeds[batch], family.count, guidance=request.guidance,
                                 temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                                 use_cache=use_cache, autocast=gen.autocast).cpu())
    return time.perf_counter() - start, torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an ar run dir")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    gen = load_run(args.run, device=args.device)
    if gen.kind != "ar":
        parser.error(f"{args.run} is a {gen.kind} run; this benchmark needs an ar run")
    prompts = (benchmark_prompts("train", 20) * args.images)[:args.images]
    request = GenerationRequest(prompts=prompts, batch_size=args.batch_size).resolved(gen)
    draw(gen, request, prompts[:args.batch_size], True)  # warm-up: first-call allocations, the caption cache
    best, tokens = {True: float("inf"), False: float("inf")}, {}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            seconds, tokens[use_cache] = draw(gen, request, prompts, use_cache)
            best[use_cache] = min(best[use_cache], seconds)
    same = torch.equal(tokens[True], tokens[False])
    differing = int((tokens[True] != tokens[False]).any(dim=1).sum())
    print(f"{args.run}: {args.images} images of {gen.family.count} tokens, batch {args.batch_size}, "
          f"guidance {request.guidance}, temperature {request.temperature}, top-k {request.top_k}, "
          f"top-p {request.top_p}, {gen.device}, {gen.precision}, {torch.get_num_threads()} threads")
    print(f"| decoding | images/s | x without the cache |\n|---|---:|---:|")
    for use_cache in (False, True):
        print(f"| {'KV cache' if use_cache else 'no cache (whole sequence per token)'} | "
              f"{args.images / best[use_cache]:.1f} | {best[False] / best[use_cache]:.2f} |")
    print(f"same tokens: {same} ({differing} of {args.images} images differ)")


if __name__ == "__main__":
    main()
