"""Benchmark `vgen generate`: images/s, the sampler's own overhead, and Heun versus Euler.

Loads a trained flow run (default demo/model, made by `make demo`) and draws --images images
(default 64; the run's sample prompts in turn, seeds 0..N-1) in one batch, with classifier-free
guidance at the run's scale, exactly as `vgen generate` does (vgen.families.flow.sample_flow).

  1. images/s with Euler at 10, 20 and 50 steps, and the sampler's overhead: the time spent outside
     the network's forward calls (noise, text features, guidance arithmetic, the Euler update) as a
     share of the total, and relative to the forward time (acceptance: at most 5%). The forward is
     timed by a wrapper around the network (torch.cuda.synchronize around it on CUDA).
  2. Heun against a reference of Euler at 100 steps: the mean absolute pixel distance (uint8
     levels, over every pixel of every image) of Heun at 5..30 steps and of Euler at 10/20/50, and
     the fewest Heun steps within the tolerance. The tolerance is the distance Euler at 50 steps
     reaches (so: "Heun is as converged as Euler-50 with N steps"), or --tolerance LEVELS.
     Heun takes 2 network calls per step but the last, so NFE (network calls) is listed too.

    python bench/generate.py                      # demo/model
    python bench/generate.py --run runs/flow --device cuda
    python bench/generate.py --quick              # 8 images, fewer steps: a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from vgen.families.flow import sample_flow
from vgen.runs import load_run
from vgen.grid import to_uint8


class TimedNetwork:
    """The model as sample_flow sees it (`encode_text`, `velocity`), adding up the forward time."""

    def __init__(self, model, device: torch.device):
        self.model, self.device, self.seconds, self.calls = model, device, 0.0, 0

    def encode_text(self, captions):
        return self.model.encode_text(captions)

    def velocity(self, x, t, text):
        self._sync()
        start = time.perf_counter()
        v = self.model.velocity(x, t, text)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return v

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def draw(gen, prompts, seeds, steps: int, sampler: str, guidance: float) -> tuple[torch.Tensor, float, TimedNetwork]:
    """uint8 images, total seconds, and the timed network of one sample_flow call."""
    net = TimedNetwork(gen.model, gen.device)
    net._sync()
    start = time.perf_counter()
    images = sample_flow(net, prompts, seeds, gen.image_shape, steps=steps, guidance=guidance, sampler=sampler,
                           autocast=gen.autocast, device=gen.device)
    pixels = to_uint8(images).cpu()  # waits for the device
    return pixels, time.perf_counter() - start, net


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="demo/model", help="flow run dir (default demo/model, from `make demo`)")
    parser.add_argument("--images", type=int, default=64, help="images per measurement, one batch (default 64)")
    parser.add_argument("--steps", default="10,20,50", help="Euler steps to time (default 10,20,50)")
    parser.add_argument("--heun-steps", default="5,10,15,20,30", help="Heun steps to compare (default 5,10,15,20,30)")
    parser.add_argument("--reference-steps", type=int, default=100, help="Euler steps of the reference (default 100)")
    parser.add_argument("--tolerance", type=float, help="pixel distance (levels) Heun must reach "
                        "[default: the distance of Euler at 50 steps, or the most Euler steps timed]")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per Euler setting; the fastest counts")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="8 images, Euler 4/8 vs 16, Heun 2/4: a smoke run")
    args = parser.parse_args()
    if not (Path(args.run) / "run.yaml").is_file():
        sys.exit(f"no flow run at {args.run}: make one with `make demo` (it trains demo/model), "
                 "or pass --run RUN_DIR")
    torch.set_num_threads(args.threads)
    euler_steps = [int(s) for s in args.steps.split(",")]
    heun_steps = [int(s) for s in args.heun_steps.split(",")]
    reference_steps, count = args.reference_steps, args.images
    if args.quick:
        euler_steps, heun_steps, reference_steps, count = [4, 8], [2, 4], 16, 8
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"warning: load average {busy:.1f} before starting; timings will be noisy", file=sys.stderr)

    gen = load_run(args.run, device=args.device, precision=args.precision,
                         warn=lambda m: print(m, file=sys.stderr))
    sample_prompts = gen.cfg.flow.sample_prompts
    prompts = [sample_prompts[i % len(sample_prompts)] for i in range(count)]
    seeds = list(range(count))
    guidance = gen.cfg.flow.sample_guidance
    draw(gen, prompts[:4], seeds[:4], 2, "euler", guidance)  # warm-up: kernels, text-feature cache

    print(f"run {args.run} (step {gen.step}, model {gen.sha256[:10]}), {gen.image_shape[1]} px, "
          f"{gen.device}, {gen.precision}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{count} images in one batch, guidance {guidance} (conditioned + unconditioned in one call)\n")
    print("| sampler | steps | NFE | total s | images/s | forward s | outside forward s | % of total "
          "| % over forward |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    euler_images = {}
    for steps in euler_steps:
        best = None
        for _ in range(args.repeats):
            pixels, total, net = draw(gen, prompts, seeds, steps, "euler", guidance)
            if best is None or total < best[1]:
                best = (pixels, total, net)
        pixels, total, net = best
        euler_images[steps] = pixels
        outside = total - net.seconds
        print(f"| euler | {steps} | {net.calls} | {total:.2f} | {count / total:,.1f} | {net.seconds:.2f} "
              f"| {outside:.3f} | {100 * outside / total:.1f} | {100 * outside / net.seconds:.1f} |")

    reference, ref_total, _ = draw(gen, prompts, seeds, reference_steps, "euler", guidance)
    print(f"\nreference: Euler {reference_steps} steps ({ref_total:.1f} s)\n")
    print("| sampler | steps | NFE | mean |pixel - reference| (levels) | max (levels) |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for steps in euler_steps:
        rows.append(("euler", steps, steps, distance(euler_images[steps], reference),
                     (euler_images[steps].int() - reference.int()).abs().max().item()))
    for steps in heun_steps:
        pixels, _, net = draw(gen, prompts, seeds, steps, "heun", guidance)
        rows.append(("heun", steps, net.calls, distance(pixels, reference), (pixels.int() - reference.int()).abs().max().item()))
    for name, steps, nfe, mean, worst in rows:
        print(f"| {name} | {steps} | {nfe} | {mean:.2f} | {worst} |")

    euler_for_tolerance = 50 if 50 in euler_steps else max(euler_steps)
    tolerance = args.tolerance
    source = f"--tolerance {tolerance}"
    if tolerance is None:
        tolerance = next(mean for name, steps, _, mean, _ in rows if name == "euler" and steps == euler_for_tolerance)
        source = f"the distance of Euler at {euler_for_tolerance} steps"
    within = [(steps, nfe) for name, steps, nfe, mean, _ in rows if name == "heun" and mean <= tolerance]
    print(f"\ntolerance: {tolerance:.2f} levels ({source})")
    if within:
        steps, nfe = min(within)
        print(f"Heun matches Euler-{reference_steps} within the tolerance from {steps} steps ({nfe} network calls; "
              f"Euler needs {euler_for_tolerance} for the same distance)")
    else:
        print(f"no Heun setting tried ({args.heun_steps}) is within the tolerance; try more --heun-steps")


if __name__ == "__main__":
    main()
