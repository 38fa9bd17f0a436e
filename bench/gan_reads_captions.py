"""Can the GAN's discriminator read a caption? D variants trained on real scenes alone, side by side.

A text-conditioned GAN's generator learns only what its discriminator can tell apart. This bench
trains the discriminator of `configs/gan-tiny-cpu.yaml` (and of the same config with `--set`
changes) on the demo's real 32 px scenes with the matching-aware logistic loss alone, no generator:
(real image, its caption) -> real; (the same image, a wrong caption) -> fake, with three kinds of
wrong caption, and one kind of wrong image:

  object  one named object replaced by another ("a cat above a dog" -> "a cat above a frog")
  order   left/right/above/below with the nouns swapped ("a dog above a cat")
  random  another training image's caption
  twice   and/left/right scenes with the left half mirrored onto the right (one object drawn twice;
          the caption is the true one): what a generator that draws one of two objects twice makes

It then reports, on the val split, how often D scores the true pair above each wrong one (chance
0.5). Every variant sees the same batches in the same order.

    python bench/gan_reads_captions.py --data demo/dataset --text run:demo/text-encoder \\
        --variant '' --variant 'gan.discriminator.spatial_projection=true'
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gan_variants import add_arguments, build_variants
from vgen.data import emoji_scenes as es
from vgen.data.dataset import ImageCaptionDataset
from vgen.grid import images_to_float

KINDS = ("object", "order", "random", "twice")


def wrong_caption(caption: str, kind: str, rng: random.Random, captions: list[str]) -> str | None:
    relation, nouns = es.parse_caption(caption)
    if kind == "order":
        return es.caption_for(relation, nouns[::-1]) if relation in ("left", "right", "above", "below") else None
    if kind == "random":
        while (other := rng.choice(captions)) == caption:
            pass
        return other
    # object: replace one of the named nouns
    pool = es.COUNTABLE if relation == "two" else [o.noun for o in es.OBJECTS]
    slot = rng.randrange(len(nouns))
    swapped = list(nouns)
    while swapped[slot] in nouns:
        swapped[slot] = rng.choice(pool)
    return es.caption_for(relation, swapped)


def mirrored(image: torch.Tensor) -> torch.Tensor:
    """The left half mirrored onto the right half."""
    w = image.shape[-1] // 2
    return torch.cat([image[..., :w], image[..., :w].flip(-1)], dim=-1)


def examples(data: ImageCaptionDataset, index: int, rng: random.Random, captions: list[str]):
    """(image, caption, {kind: (image, caption) or None}) for one dataset item."""
    item = data.item(index, caption_seed=index)
    image, caption = images_to_float(item["image"][None])[0], item["caption"]
    negatives = {kind: (image, c) if (c := wrong_caption(caption, kind, rng, captions)) else None
                 for kind in KINDS if kind != "twice"}
    relation, _ = es.parse_caption(caption)
    negatives["twice"] = (mirrored(image), caption) if relation in ("and", "left", "right") else None
    return image, caption, negatives


def score(family, images: list[torch.Tensor], captions: list[str]) -> torch.Tensor:
    text = family.model.g.encode_text(captions)
    return family.model.d(torch.stack(images), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, "a dataset dir (vgen preprocess) of emoji scenes")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val", type=int, default=512, help="val images to test on")
    args = parser.parse_args()

    train, val = (ImageCaptionDataset(Path(args.data), split, verify=False) for split in ("train", "val"))
    captions = sorted({c for cs in train.captions for c in cs})
    variants = []
    for name, cfg, family in build_variants(args, train.resolution):
        d = family.model.d
        params = [p for p in d.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.gan.d_optim.lr, betas=tuple(cfg.gan.d_optim.betas), weight_decay=0)
        variants.append((name, family, optimizer, [0.0]))

    order = random.Random(0)
    start = time.perf_counter()
    for step in range(args.steps):
        images, texts, labels = [], [], []
        for index in order.sample(range(len(train)), args.batch_size):
            image, caption, negatives = examples(train, index, order, captions)
            images.append(image), texts.append(caption), labels.append(1.0)
            for negative in negatives.values():
                if negative is not None:
                    images.append(negative[0]), texts.append(negative[1]), labels.append(0.0)
        target = torch.tensor(labels)
        for _, family, optimizer, seconds in variants:
            t0 = time.perf_counter()
            logits = score(family, images, texts)
            # positives weighted as all negatives together, as the GAN's real term against its fakes
            weight = torch.where(target > 0, (1 - target).sum() / target.sum(), torch.ones_like(target))
            loss = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds[0] += time.perf_counter() - t0
        if step % 100 == 0:
            print(f"step {step} ({time.perf_counter() - start:.0f} s)", flush=True)

    rng = random.Random(1)
    tests = [examples(val, i, rng, captions) for i in range(min(args.val, len(val)))]
    print(f"\n{args.steps} steps of {args.batch_size} real scenes; val pairs D scores true > wrong (chance 0.5):")
    print(f"{'variant':70s} " + " ".join(f"{k:>8s}" for k in KINDS) + "   train s")
    with torch.no_grad():
        for name, family, _, seconds in variants:
            family.model.d.eval()
            true = score(family, [t[0] for t in tests], [t[1] for t in tests])
            row = []
            for kind in KINDS:
                rows = [i for i, t in enumerate(tests) if t[2][kind] is not None]
                wrong = score(family, [tests[i][2][kind][0] for i in rows], [tests[i][2][kind][1] for i in rows])
                row.append(f"{(true[rows] > wrong).float().mean().item():8.3f}")
            print(f"{name:70s} " + " ".join(row) + f"   {seconds[0]:7.0f}")
    print(f"(val n: " + ", ".join(f"{k} {sum(t[2][k] is not None for t in tests)}" for k in KINDS) + ")")


if __name__ == "__main__":
    main()
