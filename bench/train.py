"""Benchmark training throughput: vgen's flow DiT versus diffusers' UNet2DConditionModel.

Both networks are trained side by side in one run, on the same batches (same x0, noise, t and text
tokens), with the rectified-flow loss of vgen.diffusion.flow and AdamW. The UNet is sized by a small
search over block widths, depths and 2-3 down blocks (cross-attention at the lower resolutions) to
the parameter count closest to the DiT's; it sees the same text tokens (and mask) through
cross-attention and t * 1000 as its timestep. It has no pooled-text input; the DiT gets one.

Measured, for each model at fp32 and at bf16 autocast, after --warmup steps:
  - images/s of a full training step (forward + backward + AdamW step): batch size / median step
    time. The settings run interleaved step by step, so load from other processes hits all alike.
  - GFLOP/img: FLOPs of one forward + backward at fp32 on one batch (torch FlopCounterMode: matmuls,
    convolutions, attention), divided by the batch size; the optimizer's FLOPs are not counted.
  - achieved GFLOP/s = counted FLOPs per step / median step time, as a share of this machine's fp32
    and bf16 matmul peaks, measured in the same run (best of square matmuls and the DiT's own shapes).

    python bench/train.py                          # configs/tiny-cpu.yaml, batch from the config
    python bench/train.py --batch-size 32 --steps 20
    python bench/train.py --quick                  # a tiny smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from vgen.diffusion.flow import flow_loss, interpolate, logit_normal_t
from vgen.families.config import load_train_config
from vgen.models.dit import DiT, DiTConfig
from vgen.text.encoder import TextFeatures

try:
    from diffusers import UNet2DConditionModel
except ImportError:
    sys.exit("bench/train.py needs diffusers; install it with:  pip install -e '.[bench]'")

UNET_SHAPES = [(1, 2), (1, 1, 2), (1, 2, 2), (1, 2, 4)]  # block_out_channels as multiples of a base width


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_unet(net: DiTConfig, text_width: int, mults: tuple, base: int, layers: int) -> UNet2DConditionModel:
    channels = tuple(base * m for m in mults)
    # Heads of the DiT's head width (diffusers' `attention_head_dim` is, despite its name, the head count).
    head_dim = net.width // net.heads
    heads = tuple(max(h for h in range(1, max(1, c // head_dim) + 1) if c % h == 0) for c in channels)
    return UNet2DConditionModel(
        sample_size=net.image_size, in_channels=net.channels, out_channels=net.channels,
        block_out_channels=channels, layers_per_block=layers, norm_num_groups=math.gcd(32, base),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=text_width, attention_head_dim=heads)


def matched_unet(net: DiTConfig, text_width: int, target: int) -> tuple[dict, int]:
    """The UNet layout (base width a multiple of 8) with the parameter count closest to `target`."""
    def count(**layout) -> int:
        with torch.device("meta"):  # no memory, no init: counting only
            return n_params(make_unet(net, text_width, **layout))

    best = None
    for mults in UNET_SHAPES:
        for layers in (1, 2):
            # Parameters grow about as base^2: guess the base from base 32, then try its neighbours.
            guess = 32 * math.sqrt(target / count(mults=mults, base=32, layers=layers))
            for base in {max(8, 8 * round(guess / 8) + d) for d in (-8, 0, 8)}:
                layout = dict(mults=mults, base=base, layers=layers)
                n = count(**layout)
                if best is None or abs(n - target) < abs(best[1] - target):
                    best = (layout, n)
    return best


def matmul_peak(dtype: torch.dtype, shapes: list[tuple], min_time: float) -> tuple[float, tuple]:
    """Best GFLOP/s over [m, k] @ [k, n] matmuls of `shapes`, and the shape that reached it."""
    best = (0.0, shapes[0])
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up: kernel choice, weight packing
        reps, start = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - start < min_time:
            a @ b
            reps += 1
        gflops = 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9
        best = max(best, (gflops, (m, k, n)))
    return best


def make_batches(count: int, batch: int, net: DiTConfig, text_len: int, text_width: int, pooled_width: int):
    g = torch.Generator().manual_seed(0)
    shape = (batch, net.channels, net.image_size, net.image_size)
    out = []
    for _ in range(count):
        lengths = torch.randint(1, text_len + 1, (batch, 1), generator=g)
        out.append({"x0": torch.rand(shape, generator=g) * 2 - 1, "noise": torch.randn(shape, generator=g),
                    "t": logit_normal_t(torch.randn(batch, generator=g)),
                    "text": torch.randn(batch, text_len, text_width, generator=g),
                    "embeddings": 0.02 * torch.randn(batch, text_len, text_width, generator=g),
                    "mask": torch.arange(text_len)[None] < lengths,
                    "pooled": torch.randn(batch, pooled_width, generator=g)})
    return out


def dit_forward(model, x_t, b):
    return model(x_t, b["t"], TextFeatures(b["text"], b["mask"], b["pooled"], b["embeddings"]))


def unet_forward(model, x_t, b):
    return model(x_t, b["t"] * 1000, encoder_hidden_states=b["text"], encoder_attention_mask=b["mask"]).sample


def loss_of(model, forward, b) -> torch.Tensor:
    v = forward(model, interpolate(b["x0"], b["noise"], b["t"]), b)
    return flow_loss(v, b["x0"], b["noise"]).mean()


def train_step(s: dict, b: dict) -> float:
    """One forward + backward + AdamW step; returns the loss."""
    with s["autocast"]():
        loss = loss_of(s["model"], s["forward"], b)
    s["opt"].zero_grad(set_to_none=True)
    loss.backward()
    s["opt"].step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-cpu.yaml",
                        help="vgen training config (flow.network)")
    parser.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting first (default 3)")
    parser.add_argument("--text-width", type=int, default=128,
                        help="text token and pooled width (the tiny CLIP's: 128)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="default: all cores")
    parser.add_argument("--quick", action="store_true", help="tiny network, batch 4, 2 steps: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    busy = os.getloadavg()[0]  # other processes on the cores make every thread wait: timings become noise
    if busy > 0.5:
        print(f"warning: load average {busy:.1f} before starting on {os.cpu_count()} cores; "
              f"timings with {args.threads} threads will be unreliable", file=sys.stderr)

    cfg = load_train_config(args.config)
    net, batch = cfg.flow.network, args.batch_size or cfg.train.batch_size
    if args.quick:
        net = DiTConfig(image_size=16, channels=net.channels, patch_size=2, width=64, depth=2, heads=2)
        batch, args.steps, args.warmup = args.batch_size or 4, 2, 1
    text_len = cfg.clip.context_length  # the tiny CLIP's token count

    # Peaks first, on an idle process. The DiT's own matmul shapes: tokens x width -> width, 4 width and back.
    rows = batch * (net.image_size // net.patch_size) ** 2
    squares = [(256, 256, 256), (512, 512, 512)] if args.quick else [(s, s, s) for s in (1024, 2048, 4096)]
    W = net.width
    shapes = squares + [(rows, W, W), (rows, W, 4 * W), (rows, 4 * W, W)]
    min_time = 0.05 if args.quick else 0.5
    peak32, shape32 = matmul_peak(torch.float32, shapes, min_time)
    peak16, shape16 = matmul_peak(torch.bfloat16, shapes, min_time)

    torch.manual_seed(0)
    dit = DiT(net, args.text_width, args.text_width)
    layout, _ = matched_unet(net, args.text_width, n_params(dit))
    unet = make_unet(net, args.text_width, **layout)
    models = {"vgen DiT": (dit, dit_forward), "diffusers UNet": (unet, unet_forward)}
    batches = make_batches(args.warmup + args.steps, batch, net, text_len, args.text_width, args.text_width)

    flops = {}
    for name, (model, forward) in models.items():  # counted once, fp32, on the first batch
        with FlopCounterMode(display=False) as counter:
            loss_of(model, forward, batches[0]).backward()
        model.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops()

    settings = []
    for name, (model, forward) in models.items():
        for precision in ("fp32", "bf16"):
            m = copy.deepcopy(model)  # same initial weights for both precisions, separate optimizer state
            opt = torch.optim.AdamW(m.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                    weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps, fused=True)  # as vgen train
            bf16 = precision == "bf16"
            autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
            settings.append({"name": name, "precision": precision, "model": m, "forward": forward,
                             "opt": opt, "autocast": autocast, "times": [], "loss": 0.0})
    for i, b in enumerate(batches):  # interleaved: step i of every setting, then step i + 1
        for s in settings:
            start = time.perf_counter()
            s["loss"] = train_step(s, b)
            if i >= args.warmup:
                s["times"].append(time.perf_counter() - start)
    for s in settings:
        if not math.isfinite(s["loss"]):
            sys.exit(f"{s['name']} {s['precision']}: non-finite loss {s['loss']}")

    print(f"config {args.config}{' (--quick: tiny network)' if args.quick else ''}: {net}")
    print(f"batch {batch}, {args.warmup} warm-up + {args.steps} timed steps per setting, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"UNet: block_out_channels {tuple(layout['base'] * m for m in layout['mults'])}, "
          f"layers_per_block {layout['layers']}")
    print(f"fp32 matmul peak {peak32:,.0f} GFLOP/s at {shape32}; "
          f"bf16 {peak16:,.0f} GFLOP/s at {shape16} (m, k, n)\n")
    print("| model | params | precision | images/s | GFLOP/img (fwd+bwd) | achieved GFLOP/s "
          "| % fp32 peak | % bf16 peak |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    fastest = {}
    for s in settings:
        step = statistics.median(s["times"])
        s["images_s"], s["gflops"] = batch / step, flops[s["name"]] / step / 1e9
        if s["images_s"] > fastest.get(s["name"], {"images_s": 0})["images_s"]:
            fastest[s["name"]] = s
        print(f"| {s['name']} | {n_params(s['model']):,} | {s['precision']} | {s['images_s']:,.1f} "
              f"| {flops[s['name']] / batch / 1e9:.3f} | {s['gflops']:,.1f} "
              f"| {100 * s['gflops'] / peak32:.1f} | {100 * s['gflops'] / peak16:.1f} |")
    dit_best, unet_best = fastest["vgen DiT"], fastest["diffusers UNet"]
    print(f"\nparams UNet / DiT: {n_params(unet) / n_params(dit):.3f}")
    print(f"images/s vgen DiT ({dit_best['precision']}) / diffusers UNet ({unet_best['precision']}): "
          f"{dit_best['images_s'] / unet_best['images_s']:.2f}x")
    print(f"vgen DiT achieved FLOP/s ({dit_best['precision']}) / fp32 matmul peak: "
          f"{dit_best['gflops'] / peak32:.2f}")
    if abs(n_params(unet) / n_params(dit) - 1) > 0.15:
        print("warning: no UNet layout within 15% of the DiT's parameter count; compare images/s with care")


if __name__ == "__main__":
    main()
