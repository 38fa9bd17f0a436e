"""Generation speed of several runs, side by side in one process: images/s of `vgen generate`'s
sampling path (vgen.generate.sample_images with the request `vgen generate` would build: each run's
own defaults for steps, sampler and guidance, batch size 16), and each run's ratio to the first.

Only the sampling is timed (text features, the family's sampler, the network calls, to uint8), not
PNG writing, which is the same for every family. The text encoder's per-caption cache is emptied
before each timed draw, so every draw encodes its prompts, as a fresh `vgen generate` does. Each
run draws one batch to warm up, then --images images (the benchmark's prompts in turn, seeds
0..N-1) --repeats times; the best time counts.
The runs take turns in each repeat, so a slower minute of a shared machine does not favour one.

    python bench/generation_speed.py demo/model demo/gan          # flow default vs the GAN
    python bench/generation_speed.py demo/model demo/gan --images 64 --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from vgen.data.emoji_scenes import benchmark_prompts
from vgen.generate import GenerationRequest, sample_images
from vgen.grid import to_uint8
from vgen.runs import load_run


def timed_draw(gen, request: GenerationRequest, prompts: list[str]) -> float:
    """Seconds to draw len(prompts) images in batches of request.batch_size."""
    seeds = list(range(len(prompts)))
    gen.model.text_encoder.clear_cache()
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    start = time.perf_counter()
    for first in range(0, len(prompts), request.batch_size):
        batch = slice(first, first + request.batch_size)
        to_uint8(sample_images(gen, prompts[batch], seeds[batch], request)).cpu()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs; the first is the reference of the ratios")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    prompts = (benchmark_prompts("train", 20) * args.images)[:args.images]
    loaded = []
    for run in args.runs:
        gen = load_run(run, device=args.device)
        request = GenerationRequest(prompts=prompts, batch_size=args.batch_size).resolved(gen)
        timed_draw(gen, request, prompts[:args.batch_size])  # warm-up: first-call allocations, caches
        loaded.append((run, gen, request))
    best = {run: float("inf") for run in args.runs}
    for _ in range(args.repeats):
        for run, gen, request in loaded:
            best[run] = min(best[run], timed_draw(gen, request, prompts))

    reference = args.images / best[args.runs[0]]
    print(f"{args.images} images, batch {args.batch_size}, best of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'run':<28} {'kind':<6} {'settings':<32} {'images/s':>10} {'x first':>8}")
    for run, gen, request in loaded:
        rate = args.images / best[run]
        settings = f"steps {request.steps}, {request.sampler}, cfg {request.guidance}" if request.steps else "one call"
        print(f"{run:<28} {gen.kind:<6} {settings:<32} {rate:>10.1f} {rate / reference:>8.1f}")


if __name__ == "__main__":
    main()
