"""`vgen generate`: a trained run (any family that draws) -> PNGs with their settings inside, and
generation.yaml.

    vgen.runs.load_run(run_dir, checkpoint, ...)  the family and EMA weights of a checkpoint (run.yaml)
    sample_images(gen, prompts, seeds, request)   one batch through the family's sampler
    generate(gen, request, out_dir)               the stage: batches, PNGs with metadata, grid, manifest

The family declares what its sampler supports (steps, sampler, guidance, negative prompt, editing);
a flag it does not support is refused (exit 2), never silently ignored.

Image `i` of a request gets seed `seed + i`, and its initial noise comes from a generator of its own
seeded by it (as the training sample grids do), so an image does not depend on the batch it was
drawn in, nor on the other prompts of the request.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from vgen import __version__
from vgen.atomic import atomic_directory
from vgen.errors import UsageError
from vgen.families.base import SAMPLER_OPTIONS, SampleSettings
from vgen.grid import images_to_float, make_grid, to_uint8
from vgen.manifest import sha256_file, write_manifest
from vgen.outputs import claim_new_dir, claim_output_dir
from vgen.runs import LoadedRun

GENERATION_MANIFEST = "generation.yaml"
GRID_FILE = "grid.png"
METADATA_KEY = "vgen"  # the PNG text chunk holding every setting as JSON


# --- editing inputs --------------------------------------------------------------------------------


@dataclass
class EditInputs:
    """Image editing: SDEdit from `image` at time `strength`; with `mask`, only its area changes."""

    image: torch.Tensor  # [C, H, W] in [-1, 1] at the model's resolution
    strength: float = 1.0  # start time of the ODE: 1 ignores the image (except the known region)
    mask: torch.Tensor | None = None  # [1, H, W], 1 = regenerate, 0 = keep the image


def _read_image(path: Path, option: str) -> Image.Image:
    from vgen.data.images import ImageRejected, decode_image

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot read it: {e}") from None
    try:
        return decode_image(data)
    except ImageRejected as e:
        raise UsageError(f"{option} {path}: not a readable image ({e.reason}: {e.detail})") from None


def load_edit_inputs(init_image: Path, resolution: int, strength: float = 1.0,
                     mask: Path | None = None) -> EditInputs:
    """Read the init image (and mask) and bring them to the model's resolution the way training
    images were (centre square crop + antialiased resize, vgen.data.transforms)."""
    from vgen.data.transforms import center_crop_resize

    if not 0.0 < strength <= 1.0:
        raise UsageError(f"--strength: expected a value in (0, 1], got {strength}")
    image = _read_image(Path(init_image), "--init-image")
    pixels = images_to_float(torch.from_numpy(center_crop_resize(image, resolution)))
    regenerate = None
    if mask is not None:
        mask_image = _read_image(Path(mask), "--mask")
        if mask_image.size != image.size:
            raise UsageError(f"--mask {mask}: its size {mask_image.size[0]}x{mask_image.size[1]} differs from the "
                             f"init image's {image.size[0]}x{image.size[1]} ({init_image}); they must match pixel "
                             "for pixel")
        grey = center_crop_resize(mask_image, resolution).astype(np.float32).mean(axis=0, keepdims=True)
        regenerate = torch.from_numpy((grey >= 128).astype(np.float32))  # white (>= 128) = regenerate
    return EditInputs(pixels, strength, regenerate)


# --- sampling --------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    prompts: list[str]
    n: int = 1  # images per prompt
    seed: int = 0  # image i of the request gets seed + i
    # Sampler settings (None: the run's default, for a family whose sampler takes them)
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str = ""
    sampler: str | None = None
    temperature: float | None = None  # token samplers (kind ar)
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 16
    init_image: Path | None = None
    strength: float | None = None  # default 1.0 with a mask (regenerate it fully), else required
    mask: Path | None = None
    grid: bool = False

    def asked(self) -> list[str]:
        """The sampler options (SAMPLER_OPTIONS keys) this request sets."""
        values = {"steps": self.steps, "sampler": self.sampler, "guidance": self.guidance,
                  "negative_prompt": self.negative_prompt or None, "init_image": self.init_image, "mask": self.mask,
                  **self.token_options()}
        return [name for name, value in values.items() if value is not None]

    def token_options(self) -> dict:
        """temperature, top_k, top_p: those set (a token sampler's; recorded only where set)."""
        values = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        return {name: value for name, value in values.items() if value is not None}

    def resolved(self, gen: LoadedRun) -> GenerationRequest:
        """Defaults filled from the run's family and config, every value checked; an option the
        family's sampler does not take is refused."""
        family = gen.family
        prompts = [p.strip() for p in self.prompts if p.strip()]
        if not prompts:
            raise UsageError("no prompts: give PROMPT arguments, --prompts FILE, or - to read them from stdin")
        unsupported = [name for name in self.asked() if name not in family.supports]
        if unsupported:
            takes = ", ".join(SAMPLER_OPTIONS[k] for k in SAMPLER_OPTIONS if k in family.supports) or "none of them"
            raise UsageError(f"{', '.join(SAMPLER_OPTIONS[k] for k in unsupported)}: a {gen.kind} run does not take "
                             f"{'this option' if len(unsupported) == 1 else 'these options'} (its sampler takes "
                             f"{takes}); leave {'it' if len(unsupported) == 1 else 'them'} out")
        defaults = family.sample_defaults()
        steps = defaults.get("steps") if self.steps is None else self.steps
        guidance = defaults.get("guidance") if self.guidance is None else self.guidance
        sampler = defaults.get("sampler") if self.sampler is None else self.sampler
        if sampler is not None and sampler not in family.samplers:
            raise UsageError(f"--sampler: expected one of {', '.join(family.samplers)}, got {sampler!r}")
        for name, value in (("-n", self.n), ("--steps", steps), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise UsageError(f"{name}: expected at least 1, got {value}")
        if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
            raise UsageError(f"--guidance: expected a finite scale >= 0 (1 = no guidance), got {guidance}")
        tokens = {name: defaults.get(name) if getattr(self, name) is None else getattr(self, name)
                  for name in ("temperature", "top_k", "top_p")}
        if tokens["temperature"] is not None and not (math.isfinite(tokens["temperature"]) and tokens["temperature"] > 0):
            raise UsageError(f"--temperature: expected a finite value > 0, got {tokens['temperature']}")
        if tokens["top_k"] is not None and tokens["top_k"] < 0:
            raise UsageError(f"--top-k: expected 0 (every token) or more, got {tokens['top_k']}")
        if tokens["top_p"] is not None and not 0 < tokens["top_p"] <= 1:
            raise UsageError(f"--top-p: expected a value in (0, 1] (1: every token), got {tokens['top_p']}")
        if self.init_image is None and (self.mask is not None or self.strength is not None):
            raise UsageError("--mask and --strength edit an image: give it with --init-image")
        strength = self.strength
        if self.init_image is not None and strength is None:
            if self.mask is None:
                raise UsageError("--init-image needs --strength (0 < s <= 1: how far the image is noised; "
                                 "0.6 keeps its layout) or a --mask of the area to regenerate")
            strength = 1.0
        return dataclasses.replace(self, prompts=prompts, steps=steps, sampler=sampler, strength=strength,
                                   guidance=None if guidance is None else float(guidance), **tokens)


def sample_images(gen: LoadedRun, prompts: list[str], seeds: list[int], request: GenerationRequest,
                  edit: EditInputs | None = None) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] for prompt i with seed i, from the run's family sampler
    (`request` resolved)."""
    settings = SampleSettings(steps=request.steps, guidance=request.guidance, sampler=request.sampler,
                              negative_prompts=[request.negative_prompt] * len(prompts), edit=edit,
                              temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
    return gen.family.sample(gen.model, prompts, seeds, settings, gen.autocast, gen.device)


def read_prompt_file(source: str | Path) -> list[str]:
    """Prompts one per line from a file, or from stdin for `-`; blank lines are skipped."""
    if str(source) == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        except UnicodeDecodeError as e:
            raise UsageError(f"prompts on stdin: not UTF-8 text ({e})") from None
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--prompts {source}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts {source}: cannot read it as UTF-8 text: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


DEFAULT_ROOT = Path("generations")  # default outputs: generations/YYYYmmdd-HHMMSS[-N]


def _claim(out_dir: Path | None, overwrite: bool, inputs: list[tuple[str, Path]], warn: Callable[[str], None]):
    """The generation dir, locked: `out_dir` (new, empty or an earlier generation), or a new unique
    `generations/YYYYmmdd-HHMMSS[-N]` (two runs in the same second get different names)."""
    if out_dir is None:
        return claim_new_dir(DEFAULT_ROOT, _dt.datetime.now().strftime("%Y%m%d-%H%M%S"), warn=warn)
    return claim_output_dir(out_dir, GENERATION_MANIFEST, "generation", overwrite, inputs=inputs, warn=warn)


def file_name(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "image"
    return f"{index:05d}-{slug}.png"


def parameters_text(row: dict, size: tuple[int, int], sha256: str, model: str) -> str:
    """The A1111 `parameters` text that image viewers and prompt-reading tools understand."""
    lines = [row["prompt"]]
    if row["negative_prompt"]:
        lines.append(f"Negative prompt: {row['negative_prompt']}")
    sampler = [f"Steps: {row['steps']}"] if row["steps"] is not None else []
    sampler += [f"Sampler: {row['sampler'].capitalize()}"] if row["sampler"] is not None else []
    sampler += [f"CFG scale: {row['guidance']}"] if row["guidance"] is not None else []
    sampler += [f"{name.capitalize().replace('_', '-')}: {row[name]}" for name in ("temperature", "top_k", "top_p")
                if row.get(name) is not None]
    fields = [*sampler, f"Seed: {row['seed']}", f"Size: {size[0]}x{size[1]}", f"Model hash: {sha256[:10]}",
              f"Model: {model}"]
    if row.get("strength") is not None:
        fields.append(f"Denoising strength: {row['strength']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def write_png(path: Path, pixels: torch.Tensor, parameters: str, metadata: dict) -> None:
    """uint8 [C, H, W] -> PNG with a `parameters` text chunk (A1111) and a `vgen` JSON chunk."""
    info = PngInfo()
    info.add_text("parameters", parameters)  # tEXt when latin-1, iTXt otherwise (Pillow decides)
    info.add_itxt(METADATA_KEY, json.dumps(metadata, ensure_ascii=False))
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(path, format="PNG", pnginfo=info)


def read_png_metadata(path: str | Path) -> dict:
    """The `vgen` JSON of a PNG written by `vgen generate` (and its `parameters` text)."""
    with Image.open(path) as image:
        text = dict(image.text)
    return {**json.loads(text[METADATA_KEY]), "parameters": text.get("parameters")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe(gen: LoadedRun, request: GenerationRequest) -> tuple[dict, dict, dict | None]:
    """The model, sampler settings and editing inputs of a request, as generation.yaml records them."""
    model = {"run": str(gen.run_dir.resolve()), "kind": gen.kind, "run_manifest_sha256": gen.run_manifest_sha256,
             "checkpoint": str(gen.checkpoint.relative_to(gen.run_dir)), "step": gen.step, "sha256": gen.sha256,
             "text_encoder": gen.model.text_encoder.id, **({"codec": gen.codec} if gen.codec else {}),
             **({"adapter": gen.adapter} if gen.adapter else {})}
    settings = {"sampler": request.sampler, "steps": request.steps, "guidance": request.guidance,
                **request.token_options(), "negative_prompt": request.negative_prompt, "seed": request.seed,
                "n": request.n, "batch_size": request.batch_size}
    edit = None
    if request.init_image is not None:
        edit = {"init_image": str(request.init_image), "init_image_sha256": sha256_file(request.init_image),
                "strength": request.strength, "mask": str(request.mask) if request.mask else None,
                "mask_sha256": sha256_file(request.mask) if request.mask else None}
    return model, settings, edit


def _truncated_prompts(gen: LoadedRun, prompts: list[str], warn: Callable[[str], None]) -> dict[str, int]:
    """Prompts longer than the text encoder's context (it sees only their start): warned about and
    recorded with their token counts."""
    encoder = gen.model.text_encoder
    long = {}
    for prompt in dict.fromkeys(prompts):
        count = encoder.token_count(prompt)
        if count is not None and count > encoder.context_length:
            long[prompt] = count
    for prompt, count in long.items():
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        warn(f"prompt {shown!r} needs {count} tokens; the text encoder's context holds {encoder.context_length}, "
             "so the model sees only its beginning")
    return long


def generate(gen: LoadedRun, request: GenerationRequest, out_dir: Path | None = None, overwrite: bool = False,
             progress: Callable[[int], None] = lambda n: None, warn: Callable[[str], None] | None = None,
             inputs: list[tuple[str, Path]] = ()) -> dict:
    """Run `request` and write the generation dir at `out_dir` (default: a new
    generations/YYYYmmdd-HHMMSS), atomically: complete or absent. `inputs`: other files the request
    was read from (a prompt file), which the output must not replace. Returns the summary `--json`
    prints."""
    request = request.resolved(gen)
    warn = warn or (lambda m: print(m, file=sys.stderr))
    inputs = [("run dir", gen.run_dir), *inputs] + [
        (name, path) for name, path in (("--init-image", request.init_image), ("--mask", request.mask)) if path]
    with _claim(None if out_dir is None else Path(out_dir), overwrite, inputs, warn) as claimed:
        return _generate(gen, request, claimed, progress, warn)


def _generate(gen: LoadedRun, request: GenerationRequest, out_dir: Path, progress, warn) -> dict:
    _, height, width = gen.image_shape
    edit = None
    if request.init_image is not None:
        edit = load_edit_inputs(request.init_image, height, request.strength, request.mask)
    model_info, settings, edit_info = _describe(gen, request)
    truncated = _truncated_prompts(gen, request.prompts, warn)
    # Image i of the request, prompt-major: prompt i // n, seed + i.
    jobs = [(prompt, request.seed + i)
            for i, prompt in enumerate(p for p in request.prompts for _ in range(request.n))]

    rows, all_pixels, sample_s = [], [], 0.0
    start = time.perf_counter()
    with atomic_directory(out_dir, overwrite=True) as tmp:
        for first in range(0, len(jobs), request.batch_size):
            batch = jobs[first:first + request.batch_size]
            _sync(gen.device)
            t0 = time.perf_counter()
            images = sample_images(gen, [p for p, _ in batch], [s for _, s in batch], request, edit)
            pixels = to_uint8(images).cpu()  # waits for the device
            sample_s += time.perf_counter() - t0
            for index, (prompt, seed), image in zip(range(first, first + len(batch)), batch, pixels):
                row = {"file": file_name(index, prompt), "prompt": prompt,
                       "negative_prompt": request.negative_prompt, "seed": seed, "steps": request.steps,
                       "guidance": request.guidance, "sampler": request.sampler, **request.token_options()}
                if edit_info:
                    row["strength"] = request.strength
                if prompt in truncated:
                    row["truncated"] = {"tokens": truncated[prompt], "context": gen.model.text_encoder.context_length}
                metadata = {**row, "index": index, "width": width, "height": height, "model_sha256": gen.sha256,
                            "run": model_info["run"], "checkpoint_step": gen.step,
                            "text_encoder": model_info["text_encoder"], **(edit_info or {}),
                            "vgen_version": __version__}
                write_png(tmp / row["file"], image, parameters_text(row, (width, height), gen.sha256, f"vgen-{gen.kind}"), metadata)
                rows.append({**row, "sha256": sha256_file(tmp / row["file"])})
            all_pixels.append(pixels)
            progress(len(batch))
        grid_file = None
        if request.grid:
            grid = make_grid(torch.cat(all_pixels), columns=request.n, row_labels=request.prompts)
            grid_file = GRID_FILE
            grid.save(tmp / grid_file, format="PNG")
        elapsed = time.perf_counter() - start
        timings = {"load_s": round(gen.load_seconds, 3), "sample_s": round(sample_s, 3),
                   "total_s": round(gen.load_seconds + elapsed, 3),
                   "images_per_s": round(len(jobs) / sample_s, 3) if sample_s > 0 else None}
        write_manifest(tmp / GENERATION_MANIFEST, "generation", {
            "model": model_info, "settings": settings, "edit": edit_info, "device": str(gen.device),
            "precision": gen.precision, "timings": timings, "grid": grid_file,
            "truncated_prompts": len(truncated), "images": rows})

    out = out_dir.resolve()
    return {"out_dir": str(out), "manifest": str(out / GENERATION_MANIFEST),
            "grid": str(out / grid_file) if grid_file else None, "model": model_info, "settings": settings,
            "edit": edit_info, "device": str(gen.device), "precision": gen.precision, "timings": timings,
            "truncated_prompts": list(truncated),
            "images": [{"file": str(out / r["file"]), "prompt": r["prompt"], "seed": r["seed"]} for r in rows]}
