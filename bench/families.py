"""Every generator family on one benchmark under one budget: each family's tiny CPU config trained
(or read, when its run is already done) on the embedded default's 32 px scenes with the demo's
CLIP, evaluated the same way, and its generation speed measured side by side with the others.

    python bench/families.py                                   # trains what is missing, then the table
    python bench/families.py --out .bench/families --only flow,gan,ar

The table: trainable parameters (EMA weights of the generator; the tokenizer's for ar are listed
apart), training minutes of the loop (from metrics.jsonl; prerequisite runs in brackets) and of the whole command
(when this bench trained it), the judge's accuracy
(single objects, two objects over training and held-out pairs, order), FID and KID against the val
split (Inception, N = --fid-images), and generation images/s with each run's own sampler defaults,
batch 16, the runs taking turns (bench/generation_speed.py's timing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

VGEN = [sys.executable, "-m", "vgen"]
BENCH = Path(__file__).parent

# name -> (config, extra --set values, prerequisite runs {name: config}); {out} and {text} are filled in
FAMILIES = {
    "flow": ("configs/tiny-cpu.yaml", [], {}),
    "unet": ("configs/unet-tiny-cpu.yaml", [], {}),
    "gan": ("configs/gan-tiny-cpu.yaml", [], {}),
    "vae": ("configs/vae-text-cpu.yaml", [], {}),
    "ar": ("configs/ar-tiny-cpu.yaml", ["codec=run:{out}/tokenizer"], {"tokenizer": "configs/tokenizer-tiny-cpu.yaml"}),
}


def done(run: Path) -> bool:
    manifest = run / "run.yaml"
    return manifest.is_file() and yaml.safe_load(manifest.read_text()).get("status") == "done"


def train(config: str, run: Path, data: Path, sets: list[str]) -> None:
    """Train the run unless it is done; the wall clock of the whole command (start-up, caches,
    compilation and the loop) goes to RUN.wall_s beside it."""
    if not done(run):
        start = time.perf_counter()
        subprocess.run([*VGEN, "train", "-c", config, "-d", data, "-o", run, *[a for s in sets for a in ("--set", s)]],
                       check=True)
        run.with_suffix(".wall_s").write_text(f"{time.perf_counter() - start:.1f}\n")


def wall_minutes(run: Path) -> str:
    """The wall clock of the bench's training command, when this bench trained the run."""
    path = run.with_suffix(".wall_s")
    return f"{float(path.read_text()) / 60:.1f}" if path.is_file() else "-"


def minutes(run: Path) -> float:
    """The training loop's minutes: the span of metrics.jsonl's timed rows, scaled from the first
    logged step to all of them (startup, compilation of the first steps and the final export aside)."""
    rows = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "images_per_s" in row]
    if len(rows) < 2:
        return float("nan")
    first, last = rows[0], rows[-1]
    return (last["time"] - first["time"]) * last["step"] / (last["step"] - first["step"]) / 60


def parameters(run: Path) -> int:
    from safetensors import safe_open

    newest = sorted((run / "checkpoints").iterdir())[-1]
    with safe_open(str(newest / "ema.safetensors"), "pt") as f:
        total = 0
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
        return total


def generation_speed(runs: dict[str, Path], images: int, repeats: int) -> dict[str, float]:
    spec = importlib.util.spec_from_file_location("generation_speed", BENCH / "generation_speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    from vgen.data.emoji_scenes import benchmark_prompts
    from vgen.generate import GenerationRequest
    from vgen.runs import load_run

    prompts = (benchmark_prompts("train", 20) * images)[:images]
    loaded = {}
    for name, run in runs.items():
        gen = load_run(run)
        request = GenerationRequest(prompts=prompts, batch_size=16).resolved(gen)
        speed.timed_draw(gen, request, prompts[:16])  # warm-up
        loaded[name] = (gen, request)
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, (gen, request) in loaded.items():
            best[name] = min(best[name], speed.timed_draw(gen, request, prompts))
    return {name: images / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("demo/dataset"))
    parser.add_argument("--text-encoder", default="run:demo/text-encoder")
    parser.add_argument("--out", type=Path, default=Path(".bench/families"))
    parser.add_argument("--only", default=",".join(FAMILIES), help="comma-separated families")
    parser.add_argument("--fid-images", type=int, default=2000)
    parser.add_argument("--speed-images", type=int, default=64)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; expected some of {', '.join(FAMILIES)}")
    out, data = args.out, args.data
    out.mkdir(parents=True, exist_ok=True)
    text = f"text_encoder.source={args.text_encoder}"
    runs, before = {}, {}
    for name in names:
        config, sets, prerequisites = FAMILIES[name]
        for pre, pre_config in prerequisites.items():
            train(pre_config, out / pre, data, [])
            before[name] = f"{pre} {minutes(out / pre):.1f} / {wall_minutes(out / pre)}"
        train(config, out / name, data, [text, *(s.format(out=out) for s in sets)])
        runs[name] = out / name
    metrics = {}
    for name, run in runs.items():
        evaluation = out / f"{name}-eval"
        if not (evaluation / "evaluation.yaml").is_file():
            subprocess.run([*VGEN, "evaluate", "--run", run, "--benchmark", "emoji-scenes", "--data", data,
                            "--out", evaluation, "--metrics", "fid,kid,compositional", "--checkpoints", "latest",
                            "--per-prompt", "4", "--fid-images", str(args.fid_images), "--overwrite"], check=True)
        metrics[name] = yaml.safe_load((evaluation / "evaluation.yaml").read_text())["metrics"]
    start = time.perf_counter()
    rates = generation_speed(runs, args.speed_images, repeats=2)
    print(f"\n{data}, {args.text_encoder}; generation timed side by side in {time.perf_counter() - start:.0f} s")
    print("| family | params | train min (loop / wall) | single | two (train pairs) | two (held-out) | order | FID | KID | images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        m = metrics[name]
        comp = m.get("compositional", {}).get("value", {})
        extra = f" (+ {before[name]})" if name in before else ""
        print(f"| {name} | {parameters(run) / 1e6:.2f}M | {minutes(run):.1f} / {wall_minutes(run)}{extra} | {comp.get('single_object')} | "
              f"{comp.get('two_object')} | {comp.get('two_object_held_out')} | {comp.get('order')} | "
              f"{m['fid']['value']:.1f} | {m['kid']['value']:.4f} | {rates[name]:.1f} |")


if __name__ == "__main__":
    main()
