"""What bench/gpu_check.sh measured, as JSON: per run, training images/s (the median of the logged
windows after the first, which holds torch.compile's warm-up), peak GPU memory, the first and last
losses and the precision; per generation, images/s and the sampling time.

    python bench/gpu_summary.py WORK_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml


def run_summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "images_per_s" in r]
    losses = [k for k in (train[0] if train else {}) if k.startswith("loss")]
    manifest = yaml.safe_load((run / "run.yaml").read_text()) if (run / "run.yaml").exists() else {}
    rates = [r["images_per_s"] for r in train[1:]] or [r["images_per_s"] for r in train]
    return {
        "status": manifest.get("status"), "step": train[-1]["step"] if train else 0,
        "precision": (manifest.get("environment") or {}).get("precision"),
        "images_per_s_median": round(statistics.median(rates), 1) if rates else None,
        "gpu_peak_gib": round(max((r.get("gpu_peak_gib", 0.0) for r in train), default=0.0), 2),
        **{f"{k}_first": round(train[0][k], 4) for k in losses},
        **{f"{k}_last": round(train[-1][k], 4) for k in losses},
    }


def generation_summary(gen: Path) -> dict:
    manifest = yaml.safe_load((gen / "generation.yaml").read_text())
    return {"images": len(manifest["images"]), "device": manifest["device"], "precision": manifest["precision"],
            **manifest["timings"]}


def main() -> None:
    work = Path(sys.argv[1])
    out = {}
    for path in sorted(work.iterdir()):
        try:
            if (path / "metrics.jsonl").exists():
                out[path.name] = run_summary(path)
            elif (path / "generation.yaml").exists():
                out[path.name] = generation_summary(path)
        except Exception as e:  # a run cut short by its stage's limit still reports the others
            out[path.name] = {"error": repr(e)}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
