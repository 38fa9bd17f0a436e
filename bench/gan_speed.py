"""Training throughput of GAN variants side by side: the images/s of one full GAN step (the
family's phases in order, each with its optimizer) for a config and for the same config with `--set` changes.

Each variant is built from the config with its changes, and all of them train on the same demo
batches, interleaved step by step (so load from other processes hits all alike), with R1 on every
`gan.r1_every`-th step as in training. images/s = batch size / median step time after two warm-up
steps. How the optional matching terms of the GAN were costed (bench/RESULTS.md).

    python bench/gan_speed.py --data demo/dataset --text run:demo/text-encoder \\
        --variant '' --variant 'gan.contrastive_weight=1.0,gan.mismatch_hard=1.0,gan.generator.position_queries=true'
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from gan_variants import add_arguments, build_variants
from vgen.data.dataset import ImageCaptionDataset
from vgen.randomness import SampleOrder
from vgen.train.precision import cpu_bf16_instructions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "a dataset dir (vgen preprocess) at the config's image size")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    data = ImageCaptionDataset(Path(args.data), "train", verify=False)
    bf16 = cpu_bf16_instructions()[0] is True
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    variants = []
    for name, cfg, family in build_variants(args, data.resolution):
        optimizers = []
        for phase in family.phases():
            params = [p for p in phase.module.parameters() if p.requires_grad]
            optimizers.append((phase, params, torch.optim.AdamW(params, lr=1e-5, fused=True)))
        variants.append((name, cfg, family, optimizers, []))
    batch_size = variants[0][1].train.batch_size
    order = SampleOrder(0, len(data))
    print(f"batch {batch_size}, {'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads")
    for step in range(args.steps + 2):
        for _, cfg, family, optimizers, times in variants:
            batch = family.make_batch(data, order, step, list(range(step * batch_size, (step + 1) * batch_size)))
            start = time.perf_counter()
            for phase, params, optimizer in optimizers:
                for _, other, _ in optimizers:  # as the loop: only this phase's parameters collect gradients
                    for p in other:
                        p.requires_grad_(other is params)
                with autocast():
                    loss, _ = phase.loss(phase.module, batch, step)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                times.append(time.perf_counter() - start)
    first = None
    for name, cfg, family, _, times in variants:
        rate = cfg.train.batch_size / statistics.median(times)
        first = first or rate
        print(f"{name:90s} {rate:7.1f} images/s  {rate / first:5.2f}x the first")


if __name__ == "__main__":
    main()
