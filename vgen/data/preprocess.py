"""`vgen preprocess`: a raw caption folder -> cleaned, cropped, resized image shards + dataset.yaml.

Work is streamed: discovery yields files in a fixed order, a process pool decodes and resizes them a
bounded window at a time, and the main process appends results to shards of bounded size. Memory
therefore does not grow with the dataset, and the output is the same for any number of workers.
Everything is written into a temporary directory that is renamed only when complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vgen.atomic import atomic_directory
from vgen.data.captions import clean_captions, decode_caption_bytes, sidecar_captions, strip_control_characters
from vgen.data.discovery import Candidate, discover, normalize_caption_extensions
from vgen.data.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from vgen.data.shards import ShardWriter, rows_per_shard
from vgen.data.transforms import RESAMPLE_NAME, center_crop_resize
from vgen.errors import UsageError, VgenError
from vgen.manifest import sha256_file, write_manifest
from vgen.outputs import claim_output_dir
from vgen.text.tokenizer import DEFAULT_CONTEXT_LENGTH, CaptionTokenizer
from vgen.ui import console, printable, progress_bar, say, warn

DATASET_MANIFEST = "dataset.yaml"
INDEX_FILE = "index.jsonl"
SKIPPED_FILE = "skipped.jsonl"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class PreprocessOptions:
    resolution: int
    workers: int = 1
    val_fraction: float = 0.05
    min_size: int | None = None  # None: resolution // 2
    caption_extensions: tuple[str, ...] = ()  # empty: .txt and .caption
    caption_column: str = "text"
    allow_empty_captions: bool = False
    shard_mb: float = 32.0
    context_length: int = DEFAULT_CONTEXT_LENGTH
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False

    def validate(self) -> None:
        if not 8 <= self.resolution <= 4096:
            raise UsageError(f"--resolution must be between 8 and 4096, got {self.resolution}")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {self.workers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_size is not None and self.min_size < 1:
            raise UsageError(f"--min-size must be at least 1, got {self.min_size}")
        if self.shard_mb <= 0:
            raise UsageError(f"--shard-mb must be positive, got {self.shard_mb}")
        normalize_caption_extensions(self.caption_extensions)

    @property
    def effective_min_size(self) -> int:
        return self.min_size if self.min_size is not None else max(1, self.resolution // 2)


# ---------------------------------------------------------------- worker side (one image at a time)


@dataclass(frozen=True)
class _WorkerSettings:
    root: str
    resolution: int
    min_size: int
    allow_empty_captions: bool
    max_pixels: int
    caption_missing: bool = False  # a captioner will write the caption of an image that has none


@dataclass
class _Outcome:
    path: str
    reason: str | None = None  # None: kept
    detail: str = ""
    digest: bytes = b""
    captions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    controls: int = 0  # terminal control characters / escape sequences removed from the captions
    size: tuple[int, int] = (0, 0)
    pixels: bytes = b""
    generate_caption: bool = False  # no caption of its own: the captioner writes one


_settings: _WorkerSettings | None = None


def _init_worker(settings: _WorkerSettings) -> None:
    global _settings
    _settings = settings


def _process(candidate: Candidate) -> _Outcome:
    """Read captions and image of one candidate; never raises for a bad file."""
    assert _settings is not None
    out = _Outcome(candidate.path)
    if candidate.skip:
        out.reason, out.detail = candidate.skip
        return out
    texts = list(candidate.metadata_captions)
    out.controls = sum(strip_control_characters(t)[1] for t in texts)
    for sidecar in candidate.sidecars:
        try:
            data = Path(sidecar).read_bytes()
        except OSError as e:
            out.notes.append(f"{os.path.basename(sidecar)}: unreadable ({e.strerror})")
            continue
        lines, note = sidecar_captions(data)
        out.controls += strip_control_characters(decode_caption_bytes(data)[0])[1]
        texts.extend(lines)
        if note:
            out.notes.append(f"{os.path.basename(sidecar)}: {note}")
    out.captions = clean_captions(texts)
    if not out.captions and _settings.caption_missing:
        out.generate_caption = True
    elif not out.captions and not _settings.allow_empty_captions:
        found = "empty caption file" if candidate.sidecars else "no sidecar caption file or metadata row"
        out.reason, out.detail = "no_caption", f"{found} (use --allow-empty-captions to keep it)"
        return out
    try:
        data = Path(_settings.root, candidate.path).read_bytes()
    except OSError as e:
        out.reason, out.detail = "read_error", e.strerror or str(e)
        return out
    out.digest = hashlib.sha256(data).digest()
    try:
        image = decode_image(data, _settings.max_pixels)
    except ImageRejected as e:
        out.reason, out.detail = e.reason, e.detail
        return out
    out.size = image.size
    if min(image.size) < _settings.min_size:
        out.reason = "too_small"
        out.detail = f"{image.width}x{image.height}, shorter side below --min-size {_settings.min_size}"
        return out
    out.pixels = center_crop_resize(image, _settings.resolution).tobytes()
    return out


def _outcomes(candidates: Iterable[Candidate], settings: _WorkerSettings, workers: int, window: int) -> Iterator[_Outcome]:
    """Results in candidate order; at most two windows of work are in flight (bounded memory)."""
    if workers == 1:
        _init_worker(settings)
        yield from map(_process, candidates)
        return
    # spawn, not fork: the parent may hold torch threads and a progress-bar thread.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        in_flight: deque = deque()
        candidates = iter(candidates)
        while batch := list(itertools.islice(candidates, window)):
            in_flight.append(pool.imap(_process, batch, chunksize=max(1, len(batch) // (4 * workers))))
            if len(in_flight) == 2:
                yield from in_flight.popleft()
        while in_flight:
            yield from in_flight.popleft()


# ---------------------------------------------------------------- main side (ordering, shards, manifest)


def val_split(digest: bytes, val_fraction: float) -> str:
    """The split of an image, from its content hash, so that re-runs and copies agree."""
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


class _Stats:
    """Running statistics, so nothing per image has to be kept in memory."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        entry = self.values.setdefault(name, [float("inf"), float("-inf"), 0.0, 0])
        entry[0] = min(entry[0], value)
        entry[1] = max(entry[1], value)
        entry[2] += value
        entry[3] += 1

    def summary(self, name: str) -> dict:
        low, high, total, n = self.values.get(name, [0, 0, 0.0, 0])
        return {"min": int(low), "max": int(high), "mean": round(total / n, 2) if n else 0.0}


def preprocess(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, options: PreprocessOptions,
               captioner=None) -> dict:
    """Run the stage; return the dataset manifest. Raises VgenError when nothing could be kept.

    `captioner` (e.g. vgen.understand.captioning.RunCaptioner): `captioner(uint8 images [N, 3, R, R])
    -> captions` and `captioner.describe() -> dict`; with it, an image without a caption gets the
    one it writes instead of being skipped, marked `generated_caption` in the index and counted
    apart in dataset.yaml."""
    options.validate()
    raw, out = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if not raw.is_dir():
        raise UsageError(f"{raw_dir}: not a directory (expected a raw folder of images and captions)")
    if raw in out.parents:
        raise UsageError(f"-o {out_dir} is inside the raw folder {raw_dir}; choose a directory outside it")
    with claim_output_dir(out, DATASET_MANIFEST, "dataset", options.overwrite, inputs=[("raw folder", raw_dir)],
                          option="-o", warn=warn):
        return _preprocess(raw, out, raw_dir, out_dir, options, captioner)


def _preprocess(raw: Path, out: Path, raw_dir, out_dir, options: PreprocessOptions, captioner=None) -> dict:

    def candidates() -> Iterator[Candidate]:
        return discover(raw, options.caption_extensions or None, options.caption_column)

    total = sum(1 for _ in candidates())  # a cheap first pass, for the progress bar's total
    R = options.resolution
    settings = _WorkerSettings(str(raw), R, options.effective_min_size, options.allow_empty_captions, options.max_pixels,
                               caption_missing=captioner is not None)
    window = max(16 * options.workers, min(4096, (64 << 20) // (3 * R * R)))
    tokenizer = CaptionTokenizer(options.context_length)
    skipped: Counter[str] = Counter()
    examples: dict[str, tuple[str, str]] = {}
    first_seen: dict[bytes, str] = {}  # content hash -> first path, for exact duplicates
    stats = _Stats()
    kept = truncated = lenient = controls = controlled_images = generated = 0
    truncated_example = ""

    with atomic_directory(out, overwrite=True) as tmp:  # claim_output_dir decided it may be replaced
        (tmp / "shards").mkdir()
        rows = rows_per_shard(R, options.shard_mb)
        writers = {split: ShardWriter(tmp, split, R, rows) for split in SPLITS}
        with (
            open(tmp / INDEX_FILE, "w", encoding="utf-8") as index_file,
            open(tmp / SKIPPED_FILE, "w", encoding="utf-8") as skipped_file,
            progress_bar("preprocess", total=total) as advance,
        ):
            outcomes = _outcomes(candidates(), settings, options.workers, window)
            if captioner is not None:
                from vgen.data.generated_captions import with_generated_captions

                outcomes = with_generated_captions(outcomes, captioner, R)
            for outcome in outcomes:
                advance(1)
                if outcome.reason is None and outcome.digest in first_seen:
                    outcome.reason, outcome.detail = "duplicate", f"same content as {first_seen[outcome.digest]}"
                if outcome.reason is not None:
                    skipped[outcome.reason] += 1
                    examples.setdefault(outcome.reason, (outcome.path, outcome.detail))
                    row = {"source": outcome.path, "reason": outcome.reason, "detail": outcome.detail}
                    skipped_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                    continue
                first_seen[outcome.digest] = outcome.path
                split = val_split(outcome.digest, options.val_fraction)
                tokens = [tokenizer.count(c) for c in outcome.captions]
                over = [t > options.context_length for t in tokens]
                if any(over) and not truncated_example:
                    truncated_example = outcome.path
                truncated += sum(over)
                lenient += any("not UTF-8" in n for n in outcome.notes)
                controls += outcome.controls
                controlled_images += outcome.controls > 0
                stats.add("captions_per_image", len(outcome.captions))
                for t in tokens:
                    stats.add("tokens", t)
                shard, row_number = writers[split].next_location
                writers[split].append(kept, np.frombuffer(outcome.pixels, np.uint8).reshape(3, R, R))
                row = {
                    "id": kept,
                    "source": outcome.path,
                    "sha256": outcome.digest.hex(),
                    "captions": outcome.captions,
                    "tokens": tokens,
                    "split": split,
                    "shard": shard,
                    "row": row_number,
                    "size": list(outcome.size),
                }
                if outcome.notes:
                    row["notes"] = outcome.notes
                if outcome.generate_caption:
                    row["generated_caption"] = True
                    generated += 1
                index_file.write(json.dumps(row, ensure_ascii=False) + "\n")
                kept += 1
        for writer in writers.values():
            writer.flush()

        seen = kept + sum(skipped.values())
        _print_summary(raw_dir, seen, kept, skipped, examples, truncated, truncated_example, lenient, options)
        if controls:
            warn(f"{controls} terminal control characters or escape sequences were removed from the captions of "
                 f"{controlled_images} images")
        if kept == 0:
            raise VgenError(
                f"nothing kept from {raw_dir}: all {seen} files were skipped (reasons above); "
                "no dataset was written"
            )
        split_counts = {split: sum(s["rows"] for s in writers[split].shards) for split in SPLITS}
        manifest = write_manifest(
            tmp / DATASET_MANIFEST,
            "dataset",
            {
                "source": {"path": str(raw)},
                "resolution": R,
                "image": {"dtype": "uint8", "layout": "NCHW", "channels": 3, "range": [0, 255]},
                "transform": {
                    "crop": "centre square",
                    "resize": RESAMPLE_NAME,
                    "color": "RGB; alpha composited on white; EXIF orientation applied",
                },
                "counts": {"seen": seen, "kept": kept, "skipped": sum(skipped.values()),
                           "skipped_by_reason": dict(sorted(skipped.items()))},
                "splits": {
                    "method": "sha256 of the file bytes: val when its first 8 bytes / 2**64 < val_fraction",
                    "val_fraction": options.val_fraction,
                    **split_counts,
                },
                "shards": [s for split in SPLITS for s in writers[split].shards],
                "index": {"file": INDEX_FILE, "rows": kept, "sha256": sha256_file(tmp / INDEX_FILE)},
                "skipped": {"file": SKIPPED_FILE, "rows": seen - kept, "sha256": sha256_file(tmp / SKIPPED_FILE)},
                "captions": {
                    "tokenizer": tokenizer.name,
                    "context_length": options.context_length,
                    "per_image": stats.summary("captions_per_image"),
                    "tokens": stats.summary("tokens"),
                    "truncated": truncated,
                    "non_utf8_decoded": lenient,
                    "control_characters_removed": controls,
                    "images_with_control_characters": controlled_images,
                    # only with --caption-with: a dataset without it is byte-identical to before
                    **({"generated": generated, "generated_by": captioner.describe()} if captioner is not None else {}),
                },
                "options": {
                    **{k: v for k, v in asdict(options).items() if k not in ("overwrite", "resolution")},
                    "caption_extensions": list(normalize_caption_extensions(options.caption_extensions)),
                    "min_size": options.effective_min_size,
                },
            },
        )
    say(f"wrote {out_dir}/{DATASET_MANIFEST}: {kept} images ({split_counts['train']} train, {split_counts['val']} val)"
        + (f", {generated} of them captioned by the captioner" if captioner is not None else ""), style="green")
    return manifest


def _print_summary(raw_dir, seen, kept, skipped, examples, truncated, truncated_example, lenient, options) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(printable(f"preprocess {raw_dir}: {kept} of {seen} files kept")), title_justify="left")
    table.add_column("skipped because")
    table.add_column("files", justify="right")
    table.add_column("for example")
    for reason, count in skipped.most_common():
        path, detail = examples[reason]
        table.add_row(reason, str(count), Text(printable(f"{path}: {detail}")))
    if skipped:
        console.print(table)
        console.print(f"every skipped file is listed in {SKIPPED_FILE} with its reason")
    else:
        say(f"preprocess {raw_dir}: {kept} of {seen} files kept, none skipped")
    if truncated:
        warn(f"{truncated} captions are longer than the text encoder's {options.context_length}-token context and "
             f"will be truncated (e.g. {truncated_example})")
    if lenient:
        console.print(f"[yellow]{lenient} images have captions that were not UTF-8[/]; they were decoded "
                      f"leniently (see 'notes' in {INDEX_FILE})")
