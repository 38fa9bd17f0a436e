"""Word-order study of flow runs on emoji scenes: do the objects land in the places the prompt names?

    python bench/order_study.py RUN_DIR [RUN_DIR ...] [--seeds 4] [--device cpu]

Draws the emoji-scenes benchmark prompts (20 per relation, train pairs and held-out pairs) with
seeds 0..S-1 from each run's newest EMA weights (`vgen.generate`, the run's steps and guidance),
and reads them with a dev judge: a small CNN that names the object in each box of the prompt's
layout, trained here on freshly rendered Noto scenes of another seed (so it knows the art style of
the data, unlike the evaluation judge of `vgen evaluate`, which must not). A prompt counts as right
when every box holds the named object ("and": either order). This produced the table "Choosing the
tiny-cpu network" in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vgen.data import emoji_scenes as es  # noqa: E402
from vgen.families.flow import sample_flow  # noqa: E402
from vgen.runs import load_run  # noqa: E402
from vgen.grid import to_uint8  # noqa: E402

NOUNS = [o.noun for o in es.OBJECTS]
CROP = 16  # judge input: the box (plus a 1 px margin) at 32 px, resized to 16 x 16
JUDGE_SEED = 777  # scenes the judge learns from: not the dataset's seed 0


def crop_boxes(image: torch.Tensor, boxes) -> torch.Tensor:
    """float [3, 32, 32] -> [len(boxes), 3, CROP, CROP]; boxes in the spec's 64 px coordinates."""
    crops = []
    for x0, y0, x1, y1 in boxes:
        a, b = max(0, x0 // 2 - 1), max(0, y0 // 2 - 1)
        c, d = min(32, (x1 + 1) // 2 + 1), min(32, (y1 + 1) // 2 + 1)
        crops.append(nn.functional.interpolate(image[None, :, b:d, a:c], size=(CROP, CROP), mode="bilinear",
                                               align_corners=False)[0])
    return torch.stack(crops)


def judge_network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.GELU(), nn.Conv2d(48, 48, 3, padding=1), nn.GELU(),
                         nn.MaxPool2d(2), nn.Conv2d(48, 96, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                         nn.Conv2d(96, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, len(NOUNS)))


def train_judge(scenes: int = 12000, epochs: int = 6) -> nn.Module:
    torch.manual_seed(0)
    renderer = es.SceneRenderer()
    xs, ys = [], []
    for i in range(scenes):
        scene = es.scene_spec(JUDGE_SEED, i)
        pixels = np.asarray(renderer.render(scene).resize((32, 32), Image.Resampling.BICUBIC), dtype=np.uint8)
        image = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float() / 127.5 - 1
        for crop, placement in zip(crop_boxes(image, [p.box for p in scene.placements]), scene.placements):
            xs.append(crop)
            ys.append(NOUNS.index(placement.noun))
    x, y, held = torch.stack(xs), torch.tensor(ys), 2000
    model = judge_network()
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x) - held).split(128):
            # Generated images are noisier than renders: train on noised crops too.
            noisy = x[batch] + 0.15 * torch.randn_like(x[batch]) * torch.rand(len(batch), 1, 1, 1)
            loss = nn.functional.cross_entropy(model(noisy), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[-held:]).argmax(1) == y[-held:]).float().mean().item()
    print(f"dev judge: {len(x):,} crops of Noto scenes (seed {JUDGE_SEED}); held-out crop accuracy {accuracy:.4f}")
    return model


@torch.no_grad()
def is_right(judge: nn.Module, image: torch.Tensor, prompt: str) -> bool:
    relation, nouns = es.parse_caption(prompt)
    predicted = [NOUNS[i] for i in judge(crop_boxes(image, es.BOXES[relation])).argmax(1).tolist()]
    wanted = list(nouns) * 2 if relation == "two" else list(nouns)
    return predicted == wanted or (relation == "and" and predicted == wanted[::-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    judge = train_judge()
    relations = list(es.RELATIONS)
    print(f"\n| run | split | {' | '.join(relations)} |\n|---|---|{'---:|' * len(relations)}")
    for run in args.runs:
        gen = load_run(run, device=args.device)
        flow = gen.cfg.flow
        for split in ("train", "heldout"):
            prompts = [p for p in es.benchmark_prompts(split, 20) for _ in range(args.seeds)]
            seeds = [s for _ in range(len(prompts) // args.seeds) for s in range(args.seeds)]
            images = torch.cat([
                sample_flow(gen.model, prompts[k:k + 64], seeds[k:k + 64], gen.image_shape, steps=flow.sample_steps,
                              guidance=flow.sample_guidance, autocast=gen.autocast, device=gen.device).cpu()
                for k in range(0, len(prompts), 64)])
            images = to_uint8(images).float() / 127.5 - 1
            right: dict[str, list[bool]] = {}
            for image, prompt in zip(images, prompts):
                right.setdefault(es.parse_caption(prompt)[0], []).append(is_right(judge, image, prompt))
            cells = [f"{np.mean(right[r]):.2f}" if r in right else "-" for r in relations]
            print(f"| {run} (step {gen.step}) | {split} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
