"""Teaching the demo generator an object it never saw: a LoRA adapter against full fine-tuning, then
a second adapter on top of the first as new data arrives.

    python bench/finetune.py                       # base demo/model, work dir .bench/finetune
    python bench/finetune.py --base demo/model --text run:demo/text-encoder --data demo/dataset

Data: `vgen data emoji-scenes --objects rocket --objects-share 0.5` (half the scenes hold a rocket:
alone, two of them, or with one of the 36 in a relation; the other half are default scenes, the
replay that keeps what the model knew), preprocessed at the base's 32 px; the second folder the same
with a star. Runs: configs/finetune-lora-cpu.yaml (rank-4 LoRA), the same with `adapter: null`
(every weight trains, at --full-lr), and a star adapter started from the rocket adapter run.

Measured side by side: training wall time, trainable parameters, the size of what the run saves
(its EMA file: the adapter alone for LoRA) against the base's, how often "a <new>" samples show the
new object, and the old benchmark (vgen evaluate --benchmark emoji-scenes, compositional: the
project's judge) before and after (forgetting).

The new-object instrument: the demo CLIP's image embedding of a sample, nearest to the centroids of
rendered single-object scenes of the 36 objects and the new ones (a nearest-template check in CLIP
space); its own accuracy on held-out renders is printed next to the rates.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VGEN = [sys.executable, "-m", "vgen"]


def sh(cmd: list[str]) -> float:
    start = time.perf_counter()
    print("$", " ".join(map(str, cmd)), flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def dataset(work: Path, name: str, noun: str, count: int, share: float, seed: int) -> Path:
    raw, out = work / f"raw-{name}", work / f"ds-{name}"
    if not (out / "dataset.yaml").is_file():
        sh([*VGEN, "data", "emoji-scenes", raw, "--count", count, "--seed", seed, "--objects", noun,
            "--objects-share", share, "--overwrite"])
        sh([*VGEN, "preprocess", raw, "--out", out, "--resolution", 32, "--overwrite"])
    return out


def train(work: Path, name: str, data: Path, sets: list[str]) -> dict:
    out = work / name
    timing = work / f"{name}.time.json"
    if not (out / "run.yaml").is_file() or yaml.safe_load((out / "run.yaml").read_text())["status"] != "done":
        seconds = sh([*VGEN, "train", "-c", "configs/finetune-lora-cpu.yaml", "-d", data, "-o", out,
                      *[a for s in sets for a in ("--set", s)]])
        timing.write_text(json.dumps({"seconds": seconds}))
    return {"run": out, "seconds": json.loads(timing.read_text())["seconds"]}


# --- the new-object instrument -------------------------------------------------------------------

def _renders(nouns: list[str], per_class: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """Single-object scenes as the dataset draws them (centre box, scale 0.8-1, shift +-3 px),
    at 32 px as preprocess makes them."""
    from vgen.data import emoji_scenes as es

    renderer = es.SceneRenderer(new_nouns=[n for n in nouns if n in es.NEW_OBJECT_BY_NOUN])
    rng = random.Random(f"finetune-bench/{seed}")
    images, labels = [], []
    for label, noun in enumerate(nouns):
        for i in range(per_class):
            placement = es.Placement(noun, es.CENTER, rng.uniform(0.8, 1.0), rng.randint(-3, 3), rng.randint(-3, 3))
            scene = es.Scene(i, "single", (noun,), "", (placement,))
            images.append(renderer.render(scene).resize((32, 32), Image.Resampling.LANCZOS))
            labels.append(label)
    return images, labels


class NearestTemplate:
    def __init__(self, clip_source: str, new_nouns: list[str], per_class: int = 16):
        from vgen.data import emoji_scenes as es
        from vgen.evaluate.features import load_clip_features

        self.clip = load_clip_features(clip_source)
        self.nouns = [o.noun for o in es.OBJECTS] + list(new_nouns)
        images, labels = _renders(self.nouns, per_class, seed=0)
        emb = self.embed(images)
        labels = torch.tensor(labels)
        self.centroids = torch.nn.functional.normalize(
            torch.stack([emb[labels == k].mean(0) for k in range(len(self.nouns))]), dim=-1)
        held, held_labels = _renders(self.nouns, per_class, seed=1)
        predicted = self.classify(held)
        held_labels = torch.tensor(held_labels)
        self.accuracy = float((predicted == held_labels).float().mean())
        self.new_recall = {n: float((predicted[held_labels == self.nouns.index(n)] == self.nouns.index(n)).float().mean())
                           for n in new_nouns}
        old = held_labels < len(es.OBJECTS)
        self.false_new = float((predicted[old] >= len(es.OBJECTS)).float().mean())

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
        return torch.cat([self.clip(x[i:i + 256]) for i in range(0, len(x), 256)])

    def classify(self, images: list[Image.Image]) -> torch.Tensor:
        return (self.embed(images) @ self.centroids.T).argmax(dim=1)

    def rate(self, images: list[Image.Image], noun: str) -> float:
        return float((self.classify(images) == self.nouns.index(noun)).float().mean())


def samples(work: Path, run: Path, prompt: str, n: int) -> list[Image.Image]:
    out = work / "samples" / f"{run.name}-{prompt.replace(' ', '-')}"
    if not (out / "generation.yaml").is_file():
        sh([*VGEN, "generate", prompt, "--run", run, "-n", n, "-o", out, "--overwrite", "--grid"])
    return [Image.open(p) for p in sorted(out.glob("*.png")) if p.name != "grid.png"]


def old_benchmark(work: Path, run: Path, data: Path) -> dict:
    out = work / "eval" / run.name
    if not (out / "evaluation.yaml").is_file():
        sh([*VGEN, "evaluate", "--run", run, "--benchmark", "emoji-scenes", "--data", data, "--out", out,
            "--metrics", "compositional", "--checkpoints", "latest", "--per-prompt", 4, "--steps", 10,
            "--precision", "bf16", "--overwrite"])
    return yaml.safe_load((out / "evaluation.yaml").read_text())["headline"]["compositional"]["value"]


def saved_size(run: Path) -> int:
    from vgen.checkpoint import list_checkpoints

    return (list_checkpoints(run)[-1] / "ema.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("demo/model"))
    parser.add_argument("--text", default="run:demo/text-encoder")
    parser.add_argument("--data", type=Path, default=Path("demo/dataset"), help="the base's dataset (the old benchmark's reference)")
    parser.add_argument("--work", type=Path, default=Path(".bench/finetune"))
    parser.add_argument("--count", type=int, default=600, help="scenes per new folder")
    parser.add_argument("--share", type=float, default=0.5, help="share of scenes with the new object")
    parser.add_argument("--full-lr", type=float, default=2e-4)
    parser.add_argument("--samples", type=int, default=64, help='"a <new>" samples per run')
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the config's)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = args.base.resolve()
    common = [f"init.from=run:{base}", f"text_encoder.source={args.text}",
              *([f"train.steps={args.steps}"] if args.steps else [])]

    rockets = dataset(work, "rocket", "rocket", args.count, args.share, seed=1)
    stars = dataset(work, "star", "star", args.count, args.share, seed=2)
    runs = {"base": {"run": base, "seconds": 0.0}}
    runs["lora"] = train(work, "lora", rockets, common)
    runs["full"] = train(work, "full", rockets, [*common, "adapter=null", f"optim.lr={args.full_lr}"])
    runs["lora+star"] = train(work, "lora-star", stars, [*common, f"init.from=run:{runs['lora']['run']}"])

    judge = NearestTemplate(args.text, ["rocket", "star"])
    print(f"new-object instrument (nearest template, demo CLIP) on held-out renders: 38-way accuracy "
          f"{judge.accuracy:.3f}, rocket recall {judge.new_recall['rocket']:.3f}, star recall "
          f"{judge.new_recall['star']:.3f}, old objects called new {judge.false_new:.3f}")
    base_size = saved_size(base)
    rows = []
    for name, info in runs.items():
        run = info["run"]
        manifest = yaml.safe_load((run / "run.yaml").read_text())
        bench = old_benchmark(work, run, args.data.resolve())
        row = {"run": name, "steps": manifest["progress"]["step"], "minutes": info["seconds"] / 60,
               "saved_mb": saved_size(run) / 2**20, "saved_share": saved_size(run) / base_size,
               "rocket": judge.rate(samples(work, run, "a rocket", args.samples), "rocket"),
               "star": judge.rate(samples(work, run, "a star", args.samples), "star"),
               "single": bench["single_object"], "two_train": bench["two_object"],
               "two_heldout": bench["two_object_held_out"], "order": bench["order"]}
        rows.append(row)
    base_two = rows[0]["two_train"]
    print(f"\n{'run':10} {'steps':>5} {'min':>5} {'saved MB':>8} {'of base':>7} {'rocket':>6} {'star':>6} "
          f"{'single':>6} {'two':>6} {'drop':>6} {'held':>6} {'order':>6}")
    for r in rows:
        minutes = "-" if r["run"] == "base" else f"{r['minutes']:.1f}"  # the base is not trained here
        print(f"{r['run']:10} {r['steps']:5d} {minutes:>5} {r['saved_mb']:8.2f} {r['saved_share']:7.1%} "
              f"{r['rocket']:6.3f} {r['star']:6.3f} {r['single']:6.3f} {r['two_train']:6.3f} "
              f"{base_two - r['two_train']:6.3f} {r['two_heldout']:6.3f} {r['order']:6.3f}")
    (work / "results.json").write_text(json.dumps({"instrument": {"accuracy": judge.accuracy, "new_recall": judge.new_recall,
                                                                  "false_new": judge.false_new}, "rows": rows}, indent=1))
    print(f"\nwritten: {work / 'results.json'}")


if __name__ == "__main__":
    main()
