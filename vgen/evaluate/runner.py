"""The two ways `vgen evaluate` runs: a generation dir, or a flow run on the emoji-scenes benchmark.

Benchmark sets (generated with vgen.generate, so each is an ordinary generation dir under
EVAL_DIR/images/ that `vgen evaluate GEN_DIR` could read again):

- `fid`: `fid_images` images whose prompts are the val split's captions in order (cycled), image i
  with seed S + i. FID against the val split then compares two samples of one caption distribution,
  as COCO FID uses COCO's own validation captions.
- `benchmark`: `per_relation` prompts of every relation over training pairs and of every pair
  relation over held-out pairs (emoji_scenes.benchmark_prompts), `per_prompt` seeds each, judged for
  compositional accuracy.

With several checkpoints (`checkpoints="all"` or a list of steps) the newest gets everything and
the earlier ones the benchmark set only, so the report can plot accuracy and CLIP score by step.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vgen.atomic import atomic_directory
from vgen.errors import UsageError
from vgen.outputs import claim_output_dir, manifest_kind
from vgen.evaluate.evaluation import (
    EVALUATION_MANIFEST,
    EvalOptions,
    ImageSet,
    Log,
    ProgressFactory,
    clip_metrics,
    compositional_metrics,
    evaluate_sets,
    options_record,
    read_generation_dir,
    write_evaluation,
)
from vgen.evaluate.summary import caveats, headline

BENCHMARKS = ("emoji-scenes",)


@dataclass
class BenchmarkSettings:
    """How the benchmark's images are generated (recorded in evaluation.yaml)."""

    fid_images: int = 2000
    per_relation: int = 20  # benchmark prompts per relation (training pairs; and held-out pairs)
    per_prompt: int = 2  # seeds per benchmark prompt
    seed: int = 0
    # sampler settings; None: the run's default (a family whose sampler does not take one refuses it)
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    batch_size: int = 100
    precision: str = "auto"  # of the generator: auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16
    checkpoints: str = "all"  # all (every kept checkpoint) | latest | comma-separated steps


def fid_prompts(data_dir: Path, count: int) -> list[str]:
    """`count` prompts: the val split's captions (each image's first) in order, cycled."""
    from vgen.data.dataset import ImageCaptionDataset

    val = ImageCaptionDataset(data_dir, "val")
    captions = [c[0] for c in val.captions if c]
    if not captions:
        raise UsageError(f"{data_dir}: the val split has no captioned images to take FID prompts from")
    return [captions[i % len(captions)] for i in range(count)]


def benchmark_prompts(per_relation: int) -> list[str]:
    from vgen.data import emoji_scenes as es

    return es.benchmark_prompts("train", per_relation) + es.benchmark_prompts("heldout", per_relation)


def _select_checkpoints(run_dir: Path, which: str) -> list[int]:
    """Steps to evaluate, oldest first; the last is the one that gets every metric."""
    from vgen.checkpoint import list_checkpoints, read_checkpoint

    available = [int(read_checkpoint(p, verify=False)["step"]) for p in list_checkpoints(run_dir)]
    if not available:
        raise UsageError(f"{run_dir}: no checkpoints yet (checkpoints/ is empty); train first")
    if which == "latest":
        return [available[-1]]
    if which == "best":
        from vgen.manifest import read_manifest
        from vgen.runs import RUN_MANIFEST, best_step

        best = best_step(run_dir, read_manifest(run_dir / RUN_MANIFEST, "run"))
        if best not in available:
            raise UsageError(f"--checkpoints best: {run_dir} marks step {best} best, but its checkpoint is gone; "
                             f"it has {', '.join(map(str, available))}")
        return [best]
    if which == "all":
        return available
    try:
        steps = sorted({int(s) for s in which.split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"--checkpoints: expected latest, best, all or comma-separated steps, got {which!r}") from None
    missing = [s for s in steps if s not in available]
    if missing or not steps:
        raise UsageError(f"--checkpoints: no checkpoint at step {', '.join(map(str, missing)) or '(none given)'} "
                         f"in {run_dir}; it has {', '.join(map(str, available))}")
    return steps


def _generate_set(gen, name: str, prompts: list[str], n: int, settings: BenchmarkSettings, out: Path,
                  progress: ProgressFactory) -> ImageSet:
    from vgen.generate import GenerationRequest, generate

    request = GenerationRequest(prompts=prompts, n=n, seed=settings.seed, steps=settings.steps,
                                guidance=settings.guidance, sampler=settings.sampler,
                                batch_size=settings.batch_size)
    with progress(f"generate {name} set (step {gen.step})", len(prompts) * n) as advance:
        generate(gen, request, out, progress=advance)
    return read_generation_dir(out, name)


def _step_summary(step: int, metrics: dict[str, dict], n: int) -> dict[str, Any]:
    comp = metrics.get("compositional", {})
    clip = metrics.get("clip-score", {})
    return {"step": step, "n": n,
            "compositional": dict(comp["value"]) if "value" in comp else None,  # a copy: no YAML aliases
            "clip_score": clip.get("value") if "value" in clip else None}


def evaluate_benchmark(run_dir: Path, data_dir: Path, out_dir: Path, options: EvalOptions,
                       settings: BenchmarkSettings, benchmark: str = "emoji-scenes", overwrite: bool = False,
                       progress: ProgressFactory | None = None, log: Log | None = None) -> dict:
    """Generate the benchmark's sets from the run's checkpoint(s), evaluate them, write EVAL_DIR."""
    progress, log = progress or _no_progress, log or (lambda m: None)
    if benchmark not in BENCHMARKS:
        raise UsageError(f"--benchmark: unknown {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    for name, value in (("--fid-images", settings.fid_images), ("--per-relation", settings.per_relation),
                        ("--per-prompt", settings.per_prompt), ("--batch-size", settings.batch_size)):
        if value < 1:
            raise UsageError(f"{name}: expected at least 1, got {value}")
    with claim_output_dir(out_dir, EVALUATION_MANIFEST, "evaluation", overwrite,
                          inputs=[("run dir", run_dir), ("dataset", data_dir)], warn=log):
        return _evaluate_benchmark(Path(run_dir), Path(data_dir), Path(out_dir), options, settings, benchmark,
                                   progress, log)


def _evaluate_benchmark(run_dir: Path, data_dir: Path, out_dir: Path, options: EvalOptions,
                        settings: BenchmarkSettings, benchmark: str, progress: ProgressFactory, log: Log) -> dict:
    from vgen.runs import load_run

    steps = _select_checkpoints(Path(run_dir), settings.checkpoints)
    start = time.perf_counter()
    prompts_fid = fid_prompts(data_dir, settings.fid_images)
    prompts_bench = benchmark_prompts(settings.per_relation)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        by_step, sets, generation = [], {}, {}
        for step in steps:
            final = step == steps[-1]
            gen = load_run(run_dir, step, options.device, settings.precision,
                                 warn=lambda m: log(m))
            folder = tmp / "images" if final else tmp / "images" / f"step-{step:08d}"
            t0 = time.perf_counter()
            # Earlier checkpoints: one seed per prompt, enough for a trend at a fraction of the cost.
            bench = _generate_set(gen, "benchmark", prompts_bench, settings.per_prompt if final else 1, settings,
                                  folder / "benchmark", progress)
            clip_source = options.clip or gen.cfg.text_encoder.source
            if not final:
                light = dataclasses.replace(options, metrics=("clip-score", "compositional"))
                metrics = clip_metrics(bench, data_dir, clip_source, light, progress, log)
                metrics.update(compositional_metrics(bench, light, log)[0])
                by_step.append(_step_summary(step, metrics, len(bench.images)))
                continue
            fid = _generate_set(gen, "fid", prompts_fid, 1, settings, folder / "fid", progress)
            generation_s = time.perf_counter() - t0
            sets = {"fid": fid, "benchmark": bench}
            metrics, verdicts, seconds = evaluate_sets(fid, bench, data_dir, clip_source, options, progress, log)
            if len(steps) > 1:
                bench_clip = clip_metrics(bench, data_dir, clip_source,
                                          dataclasses.replace(options, metrics=("clip-score",)), progress, log)
                by_step.append(_step_summary(step, {**metrics, **bench_clip}, len(bench.images)))
            generation = {
                "model": fid.model, "precision": gen.precision, "device": str(gen.device),
                "settings": {k: v for k, v in fid.manifest["settings"].items() if k not in ("seed", "n")},
                "sets": {
                    "fid": {"path": "images/fid", "n": len(fid.images), "seed": settings.seed,
                            "prompts": f"the val split's captions in order, cycled ({len(set(prompts_fid))} distinct)"},
                    "benchmark": {"path": "images/benchmark", "n": len(bench.images), "seed": settings.seed,
                                  "prompts": f"emoji-scenes benchmark: {settings.per_relation} per relation over "
                                             "training pairs (7 relations) and held-out pairs (5 pair relations)",
                                  "per_prompt": settings.per_prompt, "distinct_prompts": len(prompts_bench)},
                },
                "generation_s": round(generation_s, 1),
            }
        notes = caveats(sets["fid"], data_dir, metrics)
        for note in notes:
            log(f"caveat: {note}")
        body = {
            "mode": "benchmark", "benchmark": benchmark, "run": str(Path(run_dir).resolve()),
            "checkpoint_step": steps[-1], "dataset": {"path": str(Path(data_dir).resolve()),
                                                      "sha256": _dataset_sha(data_dir)},
            "generation": generation, "options": {**options_record(options), **dataclasses.asdict(settings)},
            "headline": headline(metrics), "caveats": notes, "metrics": metrics, "by_step": by_step,
            "timings": {"metrics_s": seconds, "total_s": round(time.perf_counter() - start, 1)},
            "command": " ".join(sys.argv),
        }
        manifest = write_evaluation(tmp, body, verdicts)
        _write_report(tmp, manifest, sets, verdicts, Path(run_dir))
    return manifest


def evaluate_generation_dir(gen_dir: Path, data_dir: Path, out_dir: Path, options: EvalOptions,
                            overwrite: bool = False, progress: ProgressFactory | None = None,
                            log: Log | None = None) -> dict:
    """Evaluate the images of a `vgen generate` dir against the dataset; write EVAL_DIR."""
    progress, log = progress or _no_progress, log or (lambda m: None)
    with claim_output_dir(out_dir, EVALUATION_MANIFEST, "evaluation", overwrite,
                          inputs=[("generation dir", gen_dir), ("dataset", data_dir)], warn=log):
        return _evaluate_generation_dir(Path(gen_dir), Path(data_dir), Path(out_dir), options, progress, log)


def _evaluate_generation_dir(gen_dir: Path, data_dir: Path, out_dir: Path, options: EvalOptions,
                             progress: ProgressFactory, log: Log) -> dict:
    from vgen.runs import run_text_encoder_source

    start = time.perf_counter()
    images = read_generation_dir(gen_dir)
    clip_source = options.clip
    # The run the images came from (a reference to another artifact, not a file of this dir): used
    # only if it is one, i.e. holds a run manifest.
    run_dir = Path(str(images.model["run"])) if images.model.get("run") else None
    if run_dir is not None and manifest_kind(run_dir / "run.yaml") != "run":
        log(f"{images.path}: the run it names ({run_dir}) is not a run dir here; evaluating without it")
        run_dir = None
    if clip_source is None and run_dir is not None:
        clip_source = run_text_encoder_source(run_dir)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        metrics, verdicts, seconds = evaluate_sets(images, images, data_dir, clip_source, options, progress, log)
        notes = caveats(images, data_dir, metrics)
        for note in notes:
            log(f"caveat: {note}")
        body = {
            "mode": "generation-dir", "generation_dir": str(Path(gen_dir).resolve()),
            "run": str(run_dir) if run_dir else None, "checkpoint_step": images.model.get("step"),
            "dataset": {"path": str(Path(data_dir).resolve()), "sha256": _dataset_sha(data_dir)},
            "generation": {"model": images.model, "precision": images.manifest.get("precision"),
                           "settings": images.manifest.get("settings"),
                           "sets": {images.name: {"path": str(images.path), "n": len(images.images)}}},
            "options": options_record(options), "headline": headline(metrics), "caveats": notes, "metrics": metrics,
            "by_step": [],
            "timings": {"metrics_s": seconds, "total_s": round(time.perf_counter() - start, 1)},
            "command": " ".join(sys.argv),
        }
        manifest = write_evaluation(tmp, body, verdicts)
        _write_report(tmp, manifest, {images.name: images}, verdicts,
                      run_dir)
    return manifest


def _write_report(folder: Path, manifest: dict, sets: dict[str, ImageSet], verdicts: list[dict],
                  run_dir: Path | None) -> None:
    from vgen.evaluate.report import write_report

    write_report(folder, manifest, sets, verdicts, run_dir)


def _dataset_sha(data_dir: Path) -> str:
    from vgen.data.dataset import dataset_sha256

    return dataset_sha256(data_dir)


class _NoProgress:
    def __enter__(self) -> Callable[[int], None]:
        return lambda n=1: None

    def __exit__(self, *exc) -> None:
        return None


def _no_progress(description: str, total: int) -> _NoProgress:
    return _NoProgress()
