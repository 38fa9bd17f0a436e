"""Latent flow against pixel flow at 64 px, the same network, data and budget, side by side.

Both runs are the 32 px default's DiT (configs/tiny-cpu.yaml) seeing 64 tokens per image:
`latent`, configs/latent-64-cpu.yaml, patch 2 over the 16 x 16 x 4 latents of a vgen VAE
(configs/vae-tiny-cpu.yaml, trained here first unless --vae names one); `pixel`, the same config
in pixel space at 64 px with patch 8. Same steps, batch, seed, optimizer, EMA. Each is evaluated
on the emoji-scenes benchmark at 64 px (FID against the val split, the judge's accuracy), and
the table prints params, training minutes (the VAE's too), images/s and the metrics.

    vgen preprocess demo/raw -o demo/dataset-64 --resolution 64      # once
    python bench/latent_vs_pixel.py --steps 4000                       # the configs' own budget
    python bench/latent_vs_pixel.py --steps 1500 --vae demo/vae --out .bench/latent-vs-pixel
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

VGEN = [sys.executable, "-m", "vgen"]
EVAL_FLAGS = ["--steps", "10", "--per-prompt", "4", "--checkpoints", "latest", "--overwrite"]


def vgen(*args) -> float:
    start = time.perf_counter()
    subprocess.run([*VGEN, *map(str, args)], check=True)
    return time.perf_counter() - start


def train(config: str, out: Path, data: Path, sets: list[str]) -> float:
    if (out / "run.yaml").is_file() and yaml.safe_load((out / "run.yaml").read_text()).get("status") == "done":
        return float("nan")  # trained by an earlier call: its minutes are in its metrics.jsonl
    return vgen("train", "-c", config, "-d", data, "-o", out, *[a for s in sets for a in ("--set", s)])


def images_per_s(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["images_per_s"] for r in rows if "images_per_s" in r)
    return rates[len(rates) // 2] if rates else float("nan")


def parameters(run: Path) -> int:
    from safetensors import safe_open

    newest = sorted((run / "checkpoints").iterdir())[-1]
    with safe_open(str(newest / "ema.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("demo/dataset-64"))
    parser.add_argument("--text-encoder", default="run:demo/text-encoder")
    parser.add_argument("--vae", type=Path, help="a trained vae run (default: train configs/vae-tiny-cpu.yaml)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=Path(".bench/latent-vs-pixel"))
    args = parser.parse_args()
    out, data = args.out, args.data
    out.mkdir(parents=True, exist_ok=True)
    minutes = {}
    vae = args.vae or out / "vae"
    if args.vae is None:
        minutes["vae"] = train("configs/vae-tiny-cpu.yaml", vae, data, []) / 60
    common = [f"text_encoder.source={args.text_encoder}", f"train.steps={args.steps}"]
    runs = {"latent": ("configs/latent-64-cpu.yaml", [f"codec=run:{vae}"]),
            "pixel": ("configs/tiny-cpu.yaml", ["flow.network.image_size=64", "flow.network.patch_size=8"])}
    rows = {}
    for name, (config, sets) in runs.items():
        minutes[name] = train(config, out / name, data, [*common, *sets]) / 60
        eval_s = vgen("evaluate", "--run", out / name, "--benchmark", "emoji-scenes", "--data", data,
                      "--out", out / f"{name}-eval", *EVAL_FLAGS)
        manifest = yaml.safe_load((out / f"{name}-eval" / "evaluation.yaml").read_text())
        rows[name] = (manifest["metrics"], eval_s)
    print(f"\n{args.steps} steps of batch 32 each, on {data} ({'VAE trained here' if args.vae is None else vae})")
    print("| run | params | train min | images/s | FID | KID | single | two (train pairs) | two (held-out) | order |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (m, _) in rows.items():
        params = f"{parameters(out / name) / 1e6:.2f}M"
        comp = m.get("compositional", {}).get("value", {})
        extra = f" (+ VAE {minutes['vae']:.1f})" if name == "latent" and "vae" in minutes else ""
        print(f"| {name} | {params} | {minutes[name]:.1f}{extra} | {images_per_s(out / name):.1f} | "
              f"{m['fid']['value']:.1f} | {m['kid']['value']:.4f} | {comp.get('single_object')} | "
              f"{comp.get('two_object')} | {comp.get('two_object_held_out')} | {comp.get('order')} |")


if __name__ == "__main__":
    main()
