"""`vgen evaluate`: the metrics of a set of generated images against a dataset, as evaluation.yaml.

Two ways in:

- `evaluate_generation_dir`: the images of a `vgen generate` dir (its generation.yaml names each
  PNG, its prompt and the model) against DATASET's validation split.
- `evaluate_benchmark`: a flow run on the emoji-scenes benchmark (../shared/emoji-scenes.md). It
  first generates two sets (vgen.evaluate.benchmark) into EVAL_DIR/images/, then evaluates them:
  `fid` (the val split's own captions, so that FID compares like with like) for the distribution
  metrics, and `benchmark` (the benchmark's prompts, training pairs and held-out pairs, every
  relation) for compositional accuracy. With several checkpoints, the earlier ones get the benchmark
  set only (accuracy and CLIP score against the training step, for the report's plots).

Every metric is a dict with its value, N, the extractor's id and weights sha256 and the reference set
(vgen.evaluate.metrics); one that cannot be computed here (weights not installed, prompts the judge
cannot read) is `{"unavailable": reason}`, and the others are still computed. The EVAL_DIR is written
atomically: complete (evaluation.yaml, verdicts.jsonl, report.html, images/) or absent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vgen.errors import IntegrityError, ManifestError, MissingDependencyError, UsageError
from vgen.manifest import read_manifest, resolve_inside, sha256_file, write_manifest

EVALUATION_MANIFEST = "evaluation.yaml"
VERDICTS_FILE = "verdicts.jsonl"
REPORT_FILE = "report.html"

# Metric names as --metrics takes them, in report order.
INCEPTION_METRICS = ("fid", "kid", "precision-recall")
CLIP_METRICS = ("fd-clip", "kid-clip", "clip-score")
METRICS = (*INCEPTION_METRICS, *CLIP_METRICS, "compositional", "caption-agreement", "memorization")

Log = Callable[[str], None]
ProgressFactory = Callable[[str, int], Any]  # (description, total) -> context manager yielding advance(n)


def parse_metrics(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """--metrics: comma-separated names from METRICS, or `all` (the default)."""
    if text is None:
        return METRICS
    names = [n.strip() for part in ([text] if isinstance(text, str) else text) for n in part.split(",")]
    names = [n for n in names if n]
    if not names or names == ["all"]:
        return METRICS
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UsageError(f"--metrics: unknown {', '.join(map(repr, unknown))}; expected a comma-separated list of "
                         f"{', '.join(METRICS)} (or all)")
    return tuple(n for n in METRICS if n in names)


@dataclass
class EvalOptions:
    metrics: tuple[str, ...] = METRICS
    clip: str | None = None  # CLIP for the CLIP-space metrics; default: the generator's text encoder
    captioner: str | None = None  # a captioner run for caption-agreement (vgen.evaluate.caption_agreement)
    feature_precision: str = "fp32"  # of the Inception network: fp32 (the standard) or bf16
    device: str = "auto"
    batch_size: int = 25  # images per feature-extractor batch (on CPU faster than 100: bench/RESULTS.md)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    judge_cache: Path | None = None  # default ~/.cache/vgen/judge


@dataclass
class ImageSet:
    """Generated images with their prompts, read back from a generation dir (what was saved is
    what is measured)."""

    name: str
    path: Path
    images: torch.Tensor  # uint8 [N, 3, H, W]
    prompts: list[str]
    files: list[str]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest.get("model") or {}


def read_generation_dir(path: str | Path, name: str | None = None) -> ImageSet:
    """The images and prompts of a `vgen generate` dir, each PNG checked against its sha256."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory (expected a generation dir written by `vgen generate`)")
    manifest_path = path / "generation.yaml"
    if not manifest_path.is_file():
        raise UsageError(f"{path}: no generation.yaml; expected a generation dir written by `vgen generate`")
    manifest = read_manifest(manifest_path, "generation", required=("images",))
    rows = manifest["images"]
    if not isinstance(rows, list) or not rows:
        raise ManifestError(f"{manifest_path}: `images` lists no images")
    images, prompts, files = [], [], []
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or not {"file", "prompt"} <= row.keys():
            raise ManifestError(f"{manifest_path}: images[{k}] needs `file` and `prompt`")
        file = resolve_inside(path, row["file"], f"{manifest_path}: images[{k}].file")
        if not file.is_file():
            raise ManifestError(f"{manifest_path}: images[{k}] names {row['file']}, which is missing from {path}")
        if "sha256" in row and sha256_file(file) != row["sha256"]:
            raise IntegrityError(f"{file}: its sha256 differs from the one in {manifest_path}; the image was "
                                 "changed after it was generated")
        with Image.open(file) as im:
            pixels = np.asarray(im.convert("RGB"))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        prompts.append(str(row["prompt"]))
        files.append(str(row["file"]))
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise ManifestError(f"{path}: the images differ in size ({', '.join(f'{s[2]}x{s[1]}' for s in sorted(sizes))}); "
                            "a set to evaluate must share one size")
    return ImageSet(name or path.name, path, torch.stack(images), prompts, files, manifest)


# --- metric groups ---------------------------------------------------------------------------------


def unavailable(reason: str | Exception) -> dict[str, str]:
    return {"unavailable": str(reason)}


def _reference(data_dir: Path, ref, extra: dict | None = None) -> dict[str, Any]:
    return {"dataset": str(data_dir), "dataset_sha256": ref.dataset_sha256, "split": ref.split,
            "n": ref.count, "cache": str(ref.path), **(extra or {})}


def _extract(extractor, images: torch.Tensor, what: str, options: EvalOptions, progress: ProgressFactory):
    from vgen.evaluate.features import extract_features

    with progress(what, len(images)) as advance:
        return extract_features(extractor, images, options.batch_size, advance)


def _reference_features(data_dir: Path, extractor, split: str, options: EvalOptions, progress: ProgressFactory):
    from vgen.data.dataset import ImageCaptionDataset
    from vgen.evaluate.reference import reference_features, reference_is_cached

    total = 0 if reference_is_cached(data_dir, extractor, split) else len(ImageCaptionDataset(data_dir, split))
    with progress(f"{extractor.name} {split} split (reference, cached after)", total) as advance:
        return reference_features(data_dir, extractor, split, batch_size=options.batch_size, advance=advance)


def inception_metrics(images: ImageSet, data_dir: Path, options: EvalOptions, progress: ProgressFactory,
                      log: Log) -> dict[str, dict]:
    """FID, KID and precision/recall in the FID Inception network's 2048-d space, against the val split."""
    from vgen.evaluate.features import InceptionFeatures

    wanted = [m for m in INCEPTION_METRICS if m in options.metrics]
    if not wanted:
        return {}
    try:
        extractor = InceptionFeatures(precision=options.feature_precision)
    except MissingDependencyError as e:
        return {m: unavailable(e) for m in wanted}
    _to_device(extractor, options.device)
    generated = _extract(extractor, images.images, f"inception {images.name} set", options, progress)
    return reference_metrics(dict(zip(("fd", "kid", "precision-recall"), INCEPTION_METRICS)), wanted, extractor,
                             generated, images, data_dir, options, progress)


def reference_metrics(names: dict[str, str], wanted: Sequence[str], extractor, generated: torch.Tensor,
                      images: ImageSet, data_dir: Path, options: EvalOptions,
                      progress: ProgressFactory) -> dict[str, dict]:
    """The metrics against the val split's features under `extractor`: `names` maps fd / kid /
    precision-recall to the metric names they are reported as; only those in `wanted` are computed."""
    from vgen.evaluate import metrics as M

    todo = {kind: name for kind, name in names.items() if name in wanted}
    if not todo:
        return {}
    reference = _reference_features(data_dir, extractor, "val", options, progress)
    provenance = {"extractor_id": extractor.id, "weights_sha256": extractor.weights_sha256}
    compute = {
        "fd": lambda: {**M.frechet_distance(reference.statistics, generated, **provenance),
                       "extractor": extractor.description},
        "kid": lambda: M.kernel_inception_distance(reference.features, generated, options.kid_subsets,
                                                   options.kid_subset_size, **provenance),
        "precision-recall": lambda: M.precision_recall(reference.features, generated, 3, **provenance),
    }
    ref = _reference(data_dir, reference)
    return {name: {**compute[kind](), "set": images.name, "reference": ref} for kind, name in todo.items()}


def clip_metrics(images: ImageSet, data_dir: Path, clip_source: str | None, options: EvalOptions,
                 progress: ProgressFactory, log: Log) -> dict[str, dict]:
    """FD and KID in a CLIP's image-embedding space against the val split, and CLIP score against
    the images' own prompts."""
    from vgen.evaluate import metrics as M

    wanted = [m for m in CLIP_METRICS if m in options.metrics]
    if not wanted:
        return {}
    try:
        extractor = load_clip(clip_source)
    except (MissingDependencyError, UsageError) as e:
        return {m: unavailable(e) for m in wanted}
    _to_device(extractor, options.device)
    provenance = {"extractor_id": extractor.id, "weights_sha256": extractor.weights_sha256}
    generated = _extract(extractor, images.images, f"clip {images.name} set", options, progress)
    out = reference_metrics({"fd": "fd-clip", "kid": "kid-clip"}, wanted, extractor, generated, images, data_dir,
                            options, progress)
    if "clip-score" in wanted:
        out["clip-score"] = {**M.clip_score(generated, extractor.encode_text(images.prompts).cpu(), **provenance),
                             "set": images.name, "reference": "each image's own prompt"}
    return out


def load_clip(source: str | None):
    """The CLIP extractor for `source` (a vgen.text.sources source). A missing source or a random
    one raises UsageError / MissingDependencyError (reported as unavailable)."""
    from vgen.evaluate.features import load_clip_features

    if not source:
        raise UsageError("no CLIP named: pass --clip run:PATH (a vgen CLIP run) or an open_clip source")
    if source == "random":
        raise UsageError("the generator's text encoder is a randomly initialised CLIP, which measures nothing; "
                         "pass --clip with a trained one")
    return load_clip_features(source)


def compositional_metrics(images: ImageSet, options: EvalOptions, log: Log) -> tuple[dict, list[dict]]:
    """Compositional accuracy of an emoji-scenes image set by the project's judge, and the verdicts."""
    from vgen.data import emoji_scenes as es
    from vgen.evaluate import judge as J

    if "compositional" not in options.metrics:
        return {}, []
    for prompt in images.prompts:
        try:
            es.parse_caption(prompt)
        except ValueError:
            return {"compositional": unavailable(
                f"the prompt {prompt!r} of set {images.name} is not an emoji-scenes caption; the judge reads "
                "only the benchmark's grammar (evaluate a run with --benchmark emoji-scenes)")}, []
    try:
        judge = J.load_judge(options.judge_cache, log=log)
    except MissingDependencyError as e:
        return {"compositional": unavailable(e)}, []
    verdicts = judge.judge(images.images, images.prompts)
    accuracy = J.compositional_accuracy(verdicts)
    calibration = judge.info.get("calibration") or {}
    result = {
        "metric": "compositional_accuracy",
        "value": {"single_object": accuracy["single_object"]["accuracy"],
                  "two_object": accuracy["two_object_seen_pairs"]["accuracy"],
                  "two_object_held_out": accuracy["two_object_held_out_pairs"]["accuracy"],
                  "order": accuracy["order"]["accuracy"]},
        "n": len(verdicts),
        **accuracy,
        "extractor_id": judge.id,
        "weights_sha256": (judge.info.get("weights") or {}).get("sha256"),
        "set": images.name,
        "reference": "each image's own prompt (emoji-scenes caption grammar)",
        "judge": {"id": judge.id, "trained_on": judge.info.get("trained_on"),
                  "presence_top_k": J.PRESENCE_TOP_K, "calibration": calibration},
    }
    rows = [{"set": images.name, "file": f, **_verdict_row(v)} for f, v in zip(images.files, verdicts)]
    return {"compositional": result}, rows


def _verdict_row(v) -> dict[str, Any]:
    return {"prompt": v.prompt, "relation": v.relation, "expected": list(v.expected),
            "predicted": list(v.predicted), "present": list(v.present), "correct": v.correct,
            "order_correct": v.order_correct, "held_out": v.held_out}


def memorization_metrics(images: ImageSet, data_dir: Path, options: EvalOptions, progress: ProgressFactory,
                         log: Log) -> dict[str, dict]:
    """Nearest training image of each generated image, in pixels at the dataset's resolution (the
    copy test of Carlini et al. 2023, "Extracting Training Data from Diffusion Models", whole-image
    L2), with the val split's real images as the baseline a non-copying model should match."""
    from vgen.data.dataset import ImageCaptionDataset, dataset_sha256
    from vgen.evaluate import metrics as M
    from vgen.evaluate.features import resize_float

    if "memorization" not in options.metrics:
        return {}
    train = ImageCaptionDataset(data_dir, "train")
    val = ImageCaptionDataset(data_dir, "val")
    size = train.resolution

    def pixels(batch: torch.Tensor) -> torch.Tensor:
        return (resize_float(batch, size, "bicubic") / 255.0).flatten(1)

    with progress("memorization: train images", len(train)) as advance:
        chunks = []
        for start in range(0, len(train), 1024):
            rows = range(start, min(start + 1024, len(train)))
            chunks.append(pixels(torch.stack([train.image(i) for i in rows])))
            advance(len(rows))
    train_pixels = torch.cat(chunks)
    generated = M.nearest_train_distance(pixels(images.images), train_pixels, extractor_id=f"pixels:{size}px")
    baseline = M.nearest_train_distance(pixels(torch.stack([val.image(i) for i in range(len(val))])),
                                        train_pixels, extractor_id=f"pixels:{size}px")
    for pair in generated["closest"]:
        pair["generated_file"] = images.files[pair["generated"]]
        pair["train_id"] = train.ids[pair["train"]]
    return {"memorization": {
        **generated, "set": images.name, "weights_sha256": None,
        "extractor": f"RGB pixels in [0, 1] at {size}x{size} (generated images resized bicubic), L2",
        "reference": {"dataset": str(data_dir), "dataset_sha256": dataset_sha256(data_dir), "split": "train",
                      "n": len(train)},
        "baseline": {"what": "the val split's real images in place of the generated ones",
                     "value": baseline["value"], "n": baseline["n_generated"],
                     "ratio": baseline["ratio"], "distance": baseline["distance"]},
    }}


def _to_device(extractor, device: str) -> None:
    from vgen.distributed import resolve_device

    extractor.to(resolve_device(device))


# --- the whole evaluation ----------------------------------------------------------------------------


def evaluate_sets(fid_set: ImageSet, judged_set: ImageSet, data_dir: Path, clip_source: str | None,
                  options: EvalOptions, progress: ProgressFactory, log: Log) -> tuple[dict, list[dict], dict]:
    """All metrics of options.metrics: distribution metrics on `fid_set`, compositional accuracy on
    `judged_set` (may be the same set). Returns (metrics, verdict rows, seconds per metric group)."""
    from vgen.data.dataset import load_dataset_manifest
    from vgen.evaluate.caption_agreement import caption_agreement_metrics

    load_dataset_manifest(data_dir)  # a clear error for a wrong --data before any work
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    verdicts: list[dict] = []
    groups = (("inception", lambda: inception_metrics(fid_set, data_dir, options, progress, log)),
              ("clip", lambda: clip_metrics(fid_set, data_dir, clip_source, options, progress, log)),
              ("compositional", lambda: compositional_metrics(judged_set, options, log)),
              ("caption-agreement", lambda: caption_agreement_metrics(judged_set, options, log)),
              ("memorization", lambda: memorization_metrics(fid_set, data_dir, options, progress, log)))
    for name, run in groups:
        start = time.perf_counter()
        out = run()
        if name == "compositional":
            out, verdicts = out
        if out:
            results.update(out)
            seconds[name] = round(time.perf_counter() - start, 1)
    return {m: results[m] for m in METRICS if m in results}, verdicts, seconds


def write_evaluation(out_dir: Path, body: dict[str, Any], verdicts: list[dict]) -> dict:
    """evaluation.yaml and verdicts.jsonl into `out_dir` (a directory being built atomically)."""
    (out_dir / VERDICTS_FILE).write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in verdicts),
                                         encoding="utf-8")
    return write_manifest(out_dir / EVALUATION_MANIFEST, "evaluation",
                          {**body, "verdicts": VERDICTS_FILE if verdicts else None, "report": REPORT_FILE})


def options_record(options: EvalOptions) -> dict[str, Any]:
    record = dataclasses.asdict(options)
    record["metrics"] = list(options.metrics)
    record["judge_cache"] = str(options.judge_cache) if options.judge_cache else None
    return record
