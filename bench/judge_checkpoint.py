"""Score one checkpoint of a flow run on the emoji-scenes benchmark with the project's judge.

The compositional part of `vgen evaluate --run RUN --benchmark emoji-scenes` alone (no FID set, no
report), for comparing training variants quickly: the benchmark prompts (20 per relation over
training pairs, 20 per pair relation over held-out pairs), `--seeds` seeds each (seeds 0..n-1),
Euler with the run's guidance, the generator in bf16 autocast, judged by
vgen.evaluate.judge (trained on Twemoji, cached in ~/.cache/vgen/judge). About 40 s on 2 cores.

    python bench/judge_checkpoint.py demo/model                      # newest checkpoint, EMA weights
    python bench/judge_checkpoint.py demo/model --step 4000 --weights model

Run it from the directory the run was trained in when its text encoder is a relative `run:` path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from vgen.evaluate.judge import compositional_accuracy, judge_images
from vgen.evaluate.runner import benchmark_prompts
from vgen.grid import to_uint8
from vgen import checkpoint as ckpt
from vgen.families.config import train_config_from_dict
from vgen.families.base import SampleSettings
from vgen.families.flow import FlowFamily


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per benchmark prompt")
    parser.add_argument("--steps", type=int, default=10, help="Euler steps")
    parser.add_argument("--per-relation", type=int, default=20)
    args = parser.parse_args()

    body = yaml.safe_load((args.run / "run.yaml").read_text())
    cfg = train_config_from_dict(body["config"])
    task = FlowFamily(cfg, body["dataset"]["resolution"], torch.device("cpu"))
    path = (args.run / ckpt.CHECKPOINT_DIR / f"step-{args.step:08d}" if args.step is not None
            else ckpt.resolve_checkpoint(args.run)[0])
    task.model.load_state_dict(ckpt.load_tensors(path, args.weights, "cpu"))
    task.model.eval()

    prompts = benchmark_prompts(args.per_relation)
    full = [p for p in prompts for _ in range(args.seeds)]
    seeds = [s for _ in prompts for s in range(args.seeds)]
    start = time.perf_counter()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    settings = SampleSettings(steps=args.steps, guidance=cfg.flow.sample_guidance, sampler="euler")
    images = torch.cat([task.sample(task.model, full[k:k + 240], seeds[k:k + 240], settings, autocast, "cpu").cpu()
                        for k in range(0, len(full), 240)])
    acc = compositional_accuracy(judge_images(to_uint8(images), full))
    by_relation = ", ".join(f"{r} {v['accuracy']:.3f}" for r, v in acc["by_relation"].items())
    print(f"{args.run} {path.name} {args.weights}: single {acc['single_object']['accuracy']:.3f}  "
          f"two objects (training pairs) {acc['two_object_seen_pairs']['accuracy']:.3f}  "
          f"held-out pairs {acc['two_object_held_out_pairs']['accuracy']:.3f}  order {acc['order']['accuracy']:.3f}"
          f"  (N={acc['two_object_seen_pairs']['n']})\n  by relation: {by_relation}  "
          f"[{time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
