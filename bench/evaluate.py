"""Benchmark `vgen evaluate` on the demo: the trained model against the same network untrained, and
what the demo's budget settings (bf16 Inception, 10 sampler steps) change, side by side in one run.

  1. A 0-step model: `vgen train` of the demo generator config with train.steps=0 (the initialised
     network as checkpoint 0, same text encoder), evaluated on the emoji-scenes benchmark with the
     demo's settings next to the trained run (already evaluated by `make demo` in demo/eval, or
     evaluated here with --fresh). Printed: FID, KID, FD[clip], compositional accuracy of both, and
     the ratio FID(0 steps) / FID(trained) (issue 5 asks for at least 3).
  2. The trained model's FID set (demo/eval/images/fid, 2,000 images) scored by the Inception
     network in fp32 (the standard) and in bf16 (the demo's setting): the two FIDs and their ratio.
  3. With --steps20: the trained model evaluated with the run's own 20 sampler steps instead of 10.

    python bench/evaluate.py                      # after `make demo` (demo/ under the repo root)
    python bench/evaluate.py --demo-dir /tmp/demo --out .bench/evaluate --steps20
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

VGEN = [sys.executable, "-m", "vgen"]
DEMO_FLAGS = ["--steps", "10", "--precision", "bf16", "--feature-precision", "bf16"]


def run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([*VGEN, *map(str, args)], check=True)
    return time.perf_counter() - start


def metrics(eval_dir: Path) -> dict:
    return yaml.safe_load((eval_dir / "evaluation.yaml").read_text())["metrics"]


def show(label: str, m: dict) -> None:
    comp = m.get("compositional", {}).get("value", {})
    print(f"{label:<34} FID {m['fid']['value']:8.2f}  KID {m['kid']['value']:.4f}  "
          f"FD[clip] {m['fd-clip']['value']:.4f}  CLIP score {m['clip-score']['value']:.2f}  "
          f"single {comp.get('single_object')}  two {comp.get('two_object')}  "
          f"held-out {comp.get('two_object_held_out')}  (N={m['fid']['n_generated']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, default=Path("demo"))
    parser.add_argument("--out", type=Path, default=Path(".bench/evaluate"))
    parser.add_argument("--fresh", action="store_true", help="evaluate the trained run here too")
    parser.add_argument("--steps20", action="store_true", help="also evaluate with 20 sampler steps")
    args = parser.parse_args()
    demo, out = args.demo_dir, args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--benchmark", "emoji-scenes", "--data", demo / "dataset", "--checkpoints", "latest", "--overwrite"]

    zero = out / "zero-steps"
    if not (zero / "run.yaml").is_file():
        run("train", "--config", "configs/tiny-cpu.yaml", "--data", demo / "dataset", "--out", zero,
            "--set", "train.steps=0", "--set", f"text_encoder.source=run:{demo / 'text-encoder'}")
    seconds = {"zero": run("evaluate", "--run", zero, "--out", out / "eval-zero-steps", *common, *DEMO_FLAGS)}
    trained_eval = demo / "eval"
    if args.fresh or not (trained_eval / "evaluation.yaml").is_file():
        trained_eval = out / "eval-trained"
        seconds["trained"] = run("evaluate", "--run", demo / "model", "--out", trained_eval, *common, *DEMO_FLAGS)
    for precision in ("fp32", "bf16"):
        seconds[f"fid-{precision}"] = run("evaluate", trained_eval / "images" / "fid", "--data", demo / "dataset",
                                          "--out", out / f"fid-{precision}", "--metrics", "fid,kid",
                                          "--feature-precision", precision, "--overwrite")
    if args.steps20:
        seconds["steps20"] = run("evaluate", "--run", demo / "model", "--out", out / "eval-20-steps", *common,
                                 "--precision", "bf16", "--feature-precision", "bf16")

    trained, untrained = metrics(trained_eval), metrics(out / "eval-zero-steps")
    print("\n== the demo model against the same network untrained (demo settings: 10 steps, bf16)")
    show(f"trained ({trained_eval})", trained)
    show("0 steps", untrained)
    print(f"FID(0 steps) / FID(trained) = {untrained['fid']['value'] / trained['fid']['value']:.2f}  "
          f"(Inception {trained['fid']['extractor_id']}, weights sha256 {trained['fid']['weights_sha256']})")
    fp32, bf16 = metrics(out / "fid-fp32")["fid"], metrics(out / "fid-bf16")["fid"]
    print("\n== the same 2,000 images, Inception in fp32 (standard) and bf16 (the demo's setting)")
    print(f"FID fp32 {fp32['value']:.3f} ({fp32['extractor_id']}), bf16 {bf16['value']:.3f} "
          f"({bf16['extractor_id']}): bf16 / fp32 = {bf16['value'] / fp32['value']:.4f}")
    print(f"seconds (each includes loading; references cached after their first use): fp32 "
          f"{seconds['fid-fp32']:.0f}, bf16 {seconds['fid-bf16']:.0f}")
    if args.steps20:
        print("\n== 20 sampler steps (the run's default) instead of 10")
        show("trained, 20 steps", metrics(out / "eval-20-steps"))
    print("\nseconds:", {k: round(v) for k, v in seconds.items()})


if __name__ == "__main__":
    main()
