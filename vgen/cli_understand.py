"""The understanding commands of the `vgen` command line: `vgen caption`, `vgen classify`, `vgen search`.

Thin, like vgen.cli: parse, call vgen.understand, print. Human output on stderr, `--json` alone on
stdout; torch is imported only when a command runs (`vgen --help` stays fast).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from vgen.errors import UsageError, VgenError
from vgen.ui import print_json

search_app = typer.Typer(help="Search a dataset's images by text or by image with a CLIP.", no_args_is_help=True)

ClipOption = Annotated[str, typer.Option("--clip", help="The CLIP: run:PATH (a vgen clip run), local-dir:PATH, "
                                         "a .safetensors file or an open_clip pretrained tag (with --arch).")]
ArchOption = Annotated[Optional[str], typer.Option(help="open_clip architecture of a tag or .safetensors source "
                                                   "\\[default: ViT-B-32]; run:/local-dir: sources carry their own.")]
DeviceOption = Annotated[str, typer.Option(help="auto | cpu | cuda.")]
DatasetArgument = Annotated[Path, typer.Argument(help="A dataset dir (vgen preprocess).")]
SHOWN = 20  # images listed on the terminal; --json has them all


def _emit(rows: list[tuple[dict, str]], summary: dict, failed: list[tuple[str, str]], json_output: bool) -> None:
    """Per image read, a JSON line (with --json, then one with the summary) and a terminal line
    (the first SHOWN); then the images that could not be read."""
    import json

    from vgen.ui import say

    if json_output:
        for row, _ in rows:
            print(json.dumps(row, ensure_ascii=False))
        print(json.dumps({"summary": summary}, ensure_ascii=False))
    for _, line in rows[:SHOWN]:
        say(line)
    if len(rows) > SHOWN:
        say(f"... and {len(rows) - SHOWN} more (--json lists every image)")
    for name, why in failed:
        say(f"skipped {name}: {why}", style="yellow")


def _unreadable(failed: list[tuple[str, str]]) -> list[dict]:
    return [{"image": name, "reason": why} for name, why in failed]


def _nothing_read(total: int, failed: list[tuple[str, str]]) -> VgenError:
    from vgen.ui import printable

    return VgenError(f"none of the {total} images could be read (first: {printable(failed[0][0])}: {failed[0][1]})")


def _check_clip(source: str) -> None:
    if source == "random":
        raise UsageError("--clip random is an untrained CLIP, which recognises nothing; pass a trained one "
                         "(run:PATH of `vgen train -c configs/clip-tiny.yaml`, or a pretrained tag)")


def _load_clip(source: str, arch: str | None, device: str):
    from vgen.distributed import resolve_device
    from vgen.evaluate.features import load_clip_features

    _check_clip(source)
    clip = load_clip_features(source, arch)
    return clip.to(resolve_device(device))


def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files, folders of images (recursive), or a vgen "
                                                 "dataset dir (its --split, with accuracy from its captions).")],
    clip: ClipOption = ...,
    labels: Annotated[Optional[str], typer.Option(help="The classes, comma-separated: 'a cat,a dog,an apple'.")] = None,
    labels_file: Annotated[Optional[Path], typer.Option(help="The classes, one a line (# comments).")] = None,
    template: Annotated[Optional[list[str]], typer.Option(
        help="Prompt template with {} for the label, repeatable (averaged); 'imagenet' for open_clip's 80 "
             "ImageNet templates \\[default: '{}', the label as written].")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Labels reported per image.")] = 5,
    split: Annotated[str, typer.Option(help="For a dataset dir: which split.")] = "val",
    arch: ArchOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per CLIP batch.")] = 64,
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="JSON lines on stdout: one per image, then a summary.")] = False,
) -> None:
    """Zero-shot classification: which of the labels each image shows, by a CLIP (open_clip's
    prompt-ensembled zero-shot classifier; probabilities from 100 x cosine).

    Examples:
      vgen classify photos/ --clip run:demo/text-encoder --labels "a cat,a dog,an apple" --json
      vgen classify demo/dataset --clip run:demo/text-encoder --labels-file labels.txt   # val split, with accuracy
    """

    from vgen.ui import progress_bar, say
    from vgen.understand.classify import ZeroShotClassifier, accuracy, parse_labels, template_set
    from vgen.understand.inputs import collect_images, embed_images

    _check_clip(clip)
    names = parse_labels(labels, None if labels_file is None else str(labels_file))
    templates = template_set(template or [])
    items = collect_images(images, split)
    model = _load_clip(clip, arch, device)
    classifier = ZeroShotClassifier.build(model, names, templates)
    with progress_bar("classify", len(items)) as advance:
        features, kept, failed = embed_images(model, items, batch_size, advance)
    predictions = classifier.top(features, top_k)
    score = accuracy(predictions, [items[i].captions for i in kept], names)
    summary = {"images": len(kept), "unreadable": _unreadable(failed), "labels": len(names),
               "templates": len(templates), "clip": model.id, "accuracy": score}
    rows = [({"image": items[i].name, "top": [{"label": label, "p": round(p, 6)} for label, p in predicted]},
             f"{items[i].name}: " + ", ".join(f"{label} {p:.2f}" for label, p in predicted[:3]))
            for i, predicted in zip(kept, predictions)]
    _emit(rows, summary, failed, json_output)
    if score["n"]:
        say(f"accuracy over the {score['n']} images whose caption is one of the labels: "
            + ", ".join(f"{k} {v:.3f}" for k, v in score.items() if k != "n"), style="green")
    if not kept:
        raise _nothing_read(len(items), failed)


def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files, folders of images (recursive), or a vgen "
                                                 "dataset dir (its --split, scored against its captions).")],
    run: Annotated[Path, typer.Option("--run", "-r", help="A captioner run (vgen train -c configs/captioner-tiny-cpu.yaml).")] = ...,
    checkpoint: Annotated[str, typer.Option(help="latest or a step number.")] = "latest",
    decoder: Annotated[Optional[str], typer.Option(help="greedy | beam | sample \\[default: the run's captioner.sample_decoder].")] = None,
    beams: Annotated[Optional[int], typer.Option(min=1, help="Beam width for --decoder beam \\[default: the run's].")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="For --decoder sample, above 0 \\[default: the run's].")] = None,
    seed: Annotated[int, typer.Option(help="For --decoder sample: image i draws its bytes from seed S + i.")] = 0,
    split: Annotated[str, typer.Option(help="For a dataset dir: which split.")] = "val",
    write_sidecars: Annotated[bool, typer.Option(help="Write each image's caption to IMAGE.txt beside it (image files only).")] = False,
    overwrite: Annotated[bool, typer.Option(help="With --write-sidecars: replace captions that exist (else they are kept and reported).")] = False,
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="JSON lines on stdout: one per image, then a summary.")] = False,
) -> None:
    """Write a caption for each image with a captioner run (greedy, beam search or sampling).

    On a dataset dir, the written captions are scored against the true ones: exact match, BLEU-4,
    and for emoji scenes the accuracy of each slot and of the scene.

    Examples:
      vgen caption photos/ --run demo/captioner --write-sidecars
      vgen caption demo/dataset --run demo/captioner --decoder beam --json | tail -1
    """

    from vgen.atomic import atomic_write_text
    from vgen.ui import progress_bar, say
    from vgen.understand.caption_metrics import caption_scores
    from vgen.understand.captioning import RunCaptioner
    from vgen.understand.inputs import collect_images, is_dataset_dir, load_images, sidecar_refusal

    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--temperature: expected a finite number above 0, got {temperature}")
    if write_sidecars and any(is_dataset_dir(p) for p in images):
        raise UsageError("--write-sidecars writes IMAGE.txt beside image files; a dataset dir has none to write")
    items = collect_images(images, split)
    captioner = RunCaptioner(run, checkpoint, device, decoder, beams, temperature)
    with progress_bar("read", len(items)) as advance:
        pixels, kept, failed = load_images(items, captioner.input_size, advance)
    written: list[str] = []
    with progress_bar("caption", len(kept)) as advance:
        for start in range(0, len(kept), 64):
            chunk = pixels[start:start + 64]
            written += captioner(chunk, [seed + kept[i] for i in range(start, start + len(chunk))])
            advance(len(chunk))
    sidecars = {"written": 0, "kept": [], "refused": []}
    if write_sidecars:
        claimed: set[Path] = set()
        for i, text in zip(kept, written):
            path = Path(items[i].name).with_suffix(".txt")
            why = sidecar_refusal(items[i], path, claimed)
            if why:
                sidecars["refused"].append({"sidecar": str(path), "reason": why})
            elif os.path.lexists(path) and not overwrite:
                sidecars["kept"].append(str(path))
            else:
                atomic_write_text(path, text + "\n")
                sidecars["written"] += 1
            claimed.add(path)
    scores = caption_scores(written, [items[i].captions for i in kept])
    summary = {"images": len(kept), "unreadable": _unreadable(failed), "run": str(run),
               "step": captioner.loaded.step, "decoder": captioner.settings.decoder, "scores": scores,
               **({"sidecars": sidecars} if write_sidecars else {})}
    rows = [({"image": items[i].name, "caption": text, **({"true": list(items[i].captions)} if items[i].captions else {})},
             f"{items[i].name}: {text}") for i, text in zip(kept, written)]
    _emit(rows, summary, failed, json_output)
    for path in sidecars["kept"]:
        say(f"kept the existing caption {path} (--overwrite replaces it)", style="yellow")
    for refused in sidecars["refused"]:
        say(f"wrote no caption to {refused['sidecar']}: {refused['reason']}", style="yellow")
    if scores["n"]:
        say(f"against the true captions of {scores['n']} images: "
            + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "n"), style="green")
    if not kept:
        raise _nothing_read(len(items), failed)


@search_app.command("index")
def search_index(
    dataset: DatasetArgument,
    clip: ClipOption = ...,
    split: Annotated[str, typer.Option(help="train, val or all.")] = "all",
    arch: ArchOption = None,
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the index's summary as JSON on stdout.")] = False,
) -> None:
    """Embed a dataset's images with a CLIP once and cache them in the dataset dir (keyed by the
    CLIP's and the dataset's sha256: a new model or new data is embedded again).

    Example:
      vgen search index demo/dataset --clip run:demo/text-encoder
    """
    from vgen.ui import progress_bar, say
    from vgen.understand.search import SearchIndex

    model = _load_clip(clip, arch, device)
    with progress_bar("index", None) as advance:
        index = SearchIndex.build(dataset, model, split, advance)
    say(f"{len(index)} images of {dataset} indexed with {model.id}" + (" (cached)" if index.from_cache else ""),
        style="green")
    if json_output:
        print_json({"dataset": str(dataset.resolve()), "images": len(index), "clip": model.id,
                    "weights_sha256": model.weights_sha256, "from_cache": index.from_cache})


@search_app.command("query")
def search_query(
    dataset: DatasetArgument,
    text: Annotated[Optional[str], typer.Argument(help="What to look for, e.g. 'a cat above a dog'.", show_default=False)] = None,
    image: Annotated[Optional[Path], typer.Option(help="Look for images like this one instead of a text.")] = None,
    clip: ClipOption = ...,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many images to return.")] = 8,
    split: Annotated[str, typer.Option(help="train, val or all.")] = "all",
    grid: Annotated[Optional[Path], typer.Option(help="Write a contact sheet of the results (PNG) here.")] = None,
    arch: ArchOption = None,
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """The dataset's images nearest to a text or an image by cosine in the CLIP's space (exact:
    one matrix product with every indexed image; built on first use, then cached).

    Examples:
      vgen search query demo/dataset "a cat above a dog" --clip run:demo/text-encoder -k 8 --grid cats.png
      vgen search query demo/dataset --image my.png --clip run:demo/text-encoder --json
    """
    import torch

    from vgen.atomic import atomic_path
    from vgen.grid import make_grid
    from vgen.ui import printable, say
    from vgen.understand.inputs import collect_images, embed_images
    from vgen.understand.search import SearchIndex

    if (text is None) == (image is None):
        raise UsageError("give a TEXT to search for or --image PATH (one of them)")
    if image is not None and not image.is_file():
        raise UsageError(f"--image {image}: no such file")
    model = _load_clip(clip, arch, device)
    if image is not None:
        query, _, failed = embed_images(model, collect_images([image]))
        if failed:
            raise UsageError(f"--image {image}: cannot read it ({failed[0][1]})")
    else:
        query = model.encode_text([text]).cpu()
    index = SearchIndex.build(dataset, model, split)
    hits = index.search(query[0], k)
    for hit in hits:
        say(f"{hit.rank:3d}  {hit.score:.3f}  {hit.image}  {' | '.join(hit.captions)}")
    if grid is not None:
        pictures = torch.stack([index.image(hit.image) for hit in hits])
        labels = [f"{hit.score:.2f} {printable(hit.captions[0] if hit.captions else '')}" for hit in hits]
        with atomic_path(grid) as tmp:
            make_grid(pictures, columns=min(len(hits), 8), cell_labels=labels).save(tmp, format="PNG")
        say(f"grid: {grid}")
    if json_output:
        print_json({"query": text if text is not None else str(image), "dataset": str(dataset.resolve()),
                    "clip": model.id, "results": [vars(hit) for hit in hits]})


@search_app.command("eval")
def search_eval(
    dataset: DatasetArgument,
    clip: ClipOption = ...,
    split: Annotated[str, typer.Option(help="train, val or all.")] = "val",
    arch: ArchOption = None,
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the recalls as JSON on stdout.")] = False,
) -> None:
    """Text -> image recall@1/5/10: every distinct caption of the split is a query; a hit is an
    image among the k nearest whose caption equals it.

    Example:
      vgen search eval demo/dataset --clip run:demo/text-encoder --split val
    """
    from vgen.ui import say
    from vgen.understand.search import SearchIndex, text_to_image_recall

    model = _load_clip(clip, arch, device)
    index = SearchIndex.build(dataset, model, split)
    result = text_to_image_recall(index, model)
    say(f"{result['queries']} captions over {result['images']} images: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("recall")), style="green")
    if json_output:
        print_json({"dataset": str(dataset.resolve()), "split": split, "clip": model.id, **result})
