"""Training throughput of flow networks side by side: the DiT of a config against UNet variants.

One training step each (forward + backward + fused AdamW) on the same random batch, at bf16
autocast where the CPU has bf16 instructions (fp32 otherwise), eager, the networks one after the
other; images/s = batch size / median step time after two warm-up steps. This is how
`configs/unet-tiny-cpu.yaml` was sized to the DiT of `configs/tiny-cpu.yaml` (bench/RESULTS.md).

    python bench/network_speed.py                                   # the DiT and the UNet of the configs
    python bench/network_speed.py --unet '{patch_size: 1}' --unet '{width: 96}'   # variants of the UNet config
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from contextlib import nullcontext

import torch
import yaml

from vgen.families.config import load_train_config
from vgen.models import build_network
from vgen.text.encoder import TextFeatures
from vgen.train.precision import cpu_bf16_instructions

TEXT_TOKENS, TEXT_WIDTH, POOLED_WIDTH = 24, 128, 128  # the demo CLIP's (configs/clip-tiny.yaml)


def steps_per_second(net: torch.nn.Module, batch: int, size: int, steps: int, bf16: bool) -> float:
    torch.manual_seed(0)
    x, t = torch.randn(batch, 3, size, size), torch.rand(batch)
    text = TextFeatures(torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH), torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
                        torch.randn(batch, POOLED_WIDTH), torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = (net(x, t, text).float() - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit-config", default="configs/tiny-cpu.yaml")
    parser.add_argument("--unet-config", default="configs/unet-tiny-cpu.yaml")
    parser.add_argument("--unet", action="append", default=[], metavar="YAML",
                        help="a variant: keys of flow.network to change, e.g. '{patch_size: 1}' (repeatable)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    dit = load_train_config(args.dit_config).flow.network
    unet = load_train_config(args.unet_config).flow.network
    rows = [("DiT " + args.dit_config, dit), ("UNet " + args.unet_config, unet)]
    for spec in args.unet:
        changes = yaml.safe_load(spec)
        if not isinstance(changes, dict):
            parser.error(f"--unet {spec!r}: expected a YAML mapping such as '{{patch_size: 1}}'")
        rows.append((f"UNet {spec}", dataclasses.replace(unet, **changes)))
    bf16 = cpu_bf16_instructions()[0] is True
    print(f"batch {args.batch_size}, {'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads")
    first = None
    for name, cfg in rows:
        net = build_network(cfg, TEXT_WIDTH, POOLED_WIDTH)
        rate = args.batch_size * steps_per_second(net, args.batch_size, cfg.image_size, args.steps, bf16)
        first = first or rate
        params = sum(p.numel() for p in net.parameters())
        print(f"{name:60s} {params / 1e6:6.2f}M params  {rate:7.1f} images/s  {rate / first:5.2f}x the first")


if __name__ == "__main__":
    main()
