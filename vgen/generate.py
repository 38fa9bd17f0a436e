"""`vgen generate`: a trained flow run -> PNGs with their settings inside, and generation.yaml.

    load_generator(run_dir, checkpoint, device)   the EMA weights of a checkpoint, found through run.yaml
    sample_images(model, prompts, seeds, ...)     one batch: per-image noise, guidance, Euler/Heun, editing
    generate(generator, request, out_dir)         the stage: batches, PNGs with metadata, grid, manifest

Image `i` of a request gets seed `seed + i`, and its initial noise comes from a generator of its own
seeded by it (as the training sample grids do), so an image does not depend on the batch it was
drawn in, nor on the other prompts of the request.
"""

from __future__ import annotations

import contextlib
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
from vgen.diffusion.flow import interpolate
from vgen.diffusion.samplers import SAMPLERS, classifier_free_guidance, time_grid, truncate_grid
from vgen.errors import ManifestError, UsageError
from vgen.grid import make_grid, to_uint8
from vgen.manifest import read_manifest, sha256_file, write_manifest
from vgen.outputs import claim_new_dir, claim_output_dir
from vgen.train.randomness import generator

RUN_MANIFEST = "run.yaml"
GENERATION_MANIFEST = "generation.yaml"
GRID_FILE = "grid.png"
MODEL_NAME = "vgen-flow"  # `Model:` in the A1111-style parameters text
SAMPLER_LABELS = {"euler": "Euler", "heun": "Heun"}
METADATA_KEY = "vgen"  # the PNG text chunk holding every setting as JSON


# --- loading ---------------------------------------------------------------------------------------


@dataclass
class LoadedGenerator:
    """A flow run's EMA network + text encoder, ready to sample, and what identifies them."""

    model: torch.nn.Module  # vgen.models.flow_model.TextToImageFlow, eval mode
    cfg: object  # vgen.train.config.TrainConfig of the run (text_encoder.source resolved)
    run_dir: Path
    run_manifest_sha256: str
    checkpoint: Path
    step: int
    sha256: str  # of the checkpoint's ema.safetensors: the "model hash"
    device: torch.device
    precision: str  # fp32 | bf16 (autocast)
    load_seconds: float

    @property
    def image_shape(self) -> tuple[int, int, int]:
        net = self.cfg.flow.network
        return net.channels, net.image_size, net.image_size

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _not_a_run(run_dir: Path) -> ManifestError:
    hint = ""
    if (run_dir / "dataset.yaml").is_file():
        hint = " (it holds dataset.yaml: that is a dataset made by `vgen preprocess`)"
    elif (run_dir / GENERATION_MANIFEST).is_file():
        hint = " (it holds generation.yaml: that is an output of `vgen generate`)"
    return ManifestError(f"{run_dir}: not a run dir: no {RUN_MANIFEST}{hint}; expected the --out directory "
                         "of `vgen train` with a flow config")


def _resolve_text_source(source: str, run_dir: Path, manifest: dict, manifest_path: Path) -> str:
    """A relative path in `text_encoder.source` is relative to the directory training ran in.

    Tried in order: the current directory, the one training recorded (`environment.cwd`), then every
    parent of the run dir (so `run:demo/text-encoder` of `demo/model` is found from anywhere).
    """
    from vgen.text.sources import LOCAL_DIR_PREFIX, RUN_PREFIX, looks_like_path

    prefix = next((p for p in (RUN_PREFIX, LOCAL_DIR_PREFIX) if source.startswith(p)), None)
    if prefix is None:
        if not looks_like_path(source):
            return source  # a pretrained tag or `random`
        prefix = ""
    path = Path(source[len(prefix):]).expanduser()
    if path.is_absolute():
        return source  # the loader names it if it is missing
    bases = [Path.cwd()]
    recorded = (manifest.get("environment") or {}).get("cwd")
    if recorded:
        bases.append(Path(recorded))
    bases += list(run_dir.resolve().parents)
    for base in bases:
        if (base / path).exists():
            return prefix + str((base / path).resolve())
    raise UsageError(
        f"{manifest_path}: text_encoder.source {source!r} is a path relative to the directory training ran "
        f"in, and it is neither under the current directory{', ' + recorded if recorded else ''} nor under a "
        f"parent of {run_dir}; run `vgen generate` from the directory `vgen train` ran in")


def run_text_encoder_source(run_dir: str | Path) -> str:
    """The text encoder source a flow run was trained with, relative paths resolved (as loading does)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / RUN_MANIFEST
    if not manifest_path.is_file():
        raise _not_a_run(run_dir)
    manifest = read_manifest(manifest_path, "run", required=("config.text_encoder.source",))
    return _resolve_text_source(manifest["config"]["text_encoder"]["source"], run_dir, manifest, manifest_path)


def _parse_checkpoint(which: str | int) -> str | int:
    if isinstance(which, int) or which == "latest":
        return which
    if str(which).isdigit():
        return int(which)
    raise UsageError(f"--checkpoint: expected 'latest' or a step number, got {which!r}")


def load_generator(run_dir: str | Path, checkpoint: str | int = "latest", device: str = "auto",
                   precision: str = "auto", warn: Callable[[str], None] | None = None) -> LoadedGenerator:
    """The EMA weights of checkpoint `checkpoint` of the flow run at `run_dir`, with the text encoder
    and network config the run was trained with (all read through run.yaml).

    `precision` auto: bf16 autocast on CUDA; fp32 on CPU, where bf16 would make an image depend on
    the batch it was drawn in (rounding differs with the batch shape, and 20 steps amplify it).
    """
    from vgen.config import from_dict
    from vgen.train import checkpoint as ckpt
    from vgen.train.config import TrainConfig
    from vgen.train.distributed import resolve_device
    from vgen.train.flow_task import FlowTask

    start = time.perf_counter()
    run_dir = Path(run_dir)
    if run_dir.name == RUN_MANIFEST and run_dir.is_file():  # the manifest itself names its run
        run_dir = run_dir.parent
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such directory (expected a run dir made by `vgen train`, holding "
                         f"{RUN_MANIFEST} and checkpoints/)")
    manifest_path = run_dir / RUN_MANIFEST
    if not manifest_path.is_file():
        raise _not_a_run(run_dir)
    manifest = read_manifest(manifest_path, "run", required=("train_kind", "config"))
    if manifest["train_kind"] != "flow":
        raise ManifestError(f"{manifest_path}: train_kind is {manifest['train_kind']!r}; `vgen generate` needs a "
                            "flow run (train_kind: flow). A clip run is a text encoder: train a generator with "
                            f"--set text_encoder.source=run:{run_dir}")
    cfg = from_dict(TrainConfig, manifest["config"], source=str(manifest_path))
    source = _resolve_text_source(cfg.text_encoder.source, run_dir, manifest, manifest_path)
    cfg = dataclasses.replace(cfg, text_encoder=dataclasses.replace(cfg.text_encoder, source=source))

    which = _parse_checkpoint(checkpoint)
    path, state = ckpt.resolve_checkpoint(run_dir, which, warn=warn or (lambda m: print(m, file=sys.stderr)))
    torch_device = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if torch_device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"--precision: expected auto, fp32 or bf16, got {precision!r}")

    task = FlowTask(cfg, cfg.flow.network.image_size, torch_device)
    trained_with = (manifest.get("export") or {}).get("text_encoder")
    if trained_with and trained_with != task.model.text_encoder.id:
        raise ManifestError(f"{manifest_path}: the run was trained with text encoder {trained_with}, but "
                            f"text_encoder.source {source} now holds {task.model.text_encoder.id}; the generator "
                            "only understands the features of the encoder it was trained with")
    model = task.model
    try:
        model.load_state_dict(ckpt.load_tensors(path, "ema", torch_device))
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[0]
        raise ManifestError(f"{path / 'ema.safetensors'} does not fit the network of {manifest_path}: "
                            f"{detail}") from None
    model.eval().requires_grad_(False)
    return LoadedGenerator(model=model, cfg=cfg, run_dir=run_dir, run_manifest_sha256=sha256_file(manifest_path),
                           checkpoint=path, step=int(state["step"]), sha256=state["files"]["ema"]["sha256"],
                           device=torch_device, precision=precision, load_seconds=time.perf_counter() - start)


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
    from vgen.train.flow_task import images_to_float

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


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """[N, C, H, W] standard normal noise, image i from a generator seeded by seeds[i] alone (on the
    CPU, so the same seed gives the same noise on every device)."""
    return torch.stack([torch.randn(shape, generator=generator(seed)) for seed in seeds])


@torch.no_grad()
def sample_images(model, prompts: list[str], seeds: list[int], image_shape: tuple[int, int, int], *,
                  steps: int, guidance: float, sampler: str = "euler", negative_prompts: list[str] | None = None,
                  edit: EditInputs | None = None, autocast=contextlib.nullcontext,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] (float, on `device`) for prompt i with seed i.

    Classifier-free guidance runs the conditioned and the unconditioned (negative-prompted; the
    empty caption by default, which is what condition dropout trained) halves in one network call.
    """
    noise = initial_noise(seeds, image_shape).to(device)
    cond = model.encode_text(list(prompts))  # outside autocast: text features stay in fp32
    ts = time_grid(steps, device=device)

    if guidance == 1.0:  # no guidance: the unconditioned half would be thrown away
        def denoiser(x, t):
            with autocast():
                return model.velocity(x, t, cond).float()
    else:
        uncond = model.encode_text(list(negative_prompts or [""] * len(prompts)))
        both = type(cond)(*(torch.cat([c, u]) for c, u in zip(cond, uncond)))

        def velocity_pair(x, t):
            with autocast():
                return model.velocity(x, t, both).float()

        denoiser = classifier_free_guidance(velocity_pair, guidance)

    x, after_step = noise, None
    if edit is not None:
        x0 = edit.image.to(device).expand_as(noise)
        # SDEdit (Meng et al. 2022, arXiv:2108.01073): put the image on the straight path at
        # t = strength, x_t = (1 - t) x0 + t eps, and integrate the ODE from there to t = 0.
        ts = truncate_grid(ts, edit.strength)
        x = interpolate(x0, noise, ts[:1].repeat(len(seeds)))
        if edit.mask is not None:
            regenerate = edit.mask.to(device)
            keep = 1.0 - regenerate

            # Inpainting by replacement (the "replacement" method of Song et al. 2021,
            # arXiv:2011.13456, app. I; RePaint, Lugmayr et al. 2022, arXiv:2201.09865, without
            # resampling): after every step the known region is set to where the image itself is
            # on the path at t_next, with the image's own noise, so at t = 0 it is the input exactly.
            def after_step(x, t_next):
                return regenerate * x + keep * ((1 - t_next) * x0 + t_next * noise)

    return SAMPLERS[sampler](denoiser, x, ts, after_step)


# --- output ----------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    prompts: list[str]
    n: int = 1  # images per prompt
    seed: int = 0  # image i of the request gets seed + i
    steps: int | None = None  # default: the run's flow.sample_steps
    guidance: float | None = None  # default: the run's flow.sample_guidance
    negative_prompt: str = ""
    sampler: str = "euler"
    batch_size: int = 16
    init_image: Path | None = None
    strength: float | None = None  # default 1.0 with a mask (regenerate it fully), else required
    mask: Path | None = None
    grid: bool = False

    def resolved(self, cfg) -> GenerationRequest:
        """Defaults filled from the run's config, every value checked."""
        prompts = [p.strip() for p in self.prompts if p.strip()]
        if not prompts:
            raise UsageError("no prompts: give PROMPT arguments, --prompts FILE, or - to read them from stdin")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        steps = cfg.flow.sample_steps if self.steps is None else self.steps
        guidance = cfg.flow.sample_guidance if self.guidance is None else self.guidance
        for name, value in (("-n", self.n), ("--steps", steps), ("--batch-size", self.batch_size)):
            if value < 1:
                raise UsageError(f"{name}: expected at least 1, got {value}")
        if not (math.isfinite(guidance) and guidance >= 0):
            raise UsageError(f"--guidance: expected a finite scale >= 0 (1 = no guidance), got {guidance}")
        if self.init_image is None and (self.mask is not None or self.strength is not None):
            raise UsageError("--mask and --strength edit an image: give it with --init-image")
        strength = self.strength
        if self.init_image is not None and strength is None:
            if self.mask is None:
                raise UsageError("--init-image needs --strength (0 < s <= 1: how far the image is noised; "
                                 "0.6 keeps its layout) or a --mask of the area to regenerate")
            strength = 1.0
        return dataclasses.replace(self, prompts=prompts, steps=steps, guidance=float(guidance), strength=strength)


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


def parameters_text(row: dict, size: tuple[int, int], sha256: str) -> str:
    """The A1111 `parameters` text that image viewers and prompt-reading tools understand."""
    lines = [row["prompt"]]
    if row["negative_prompt"]:
        lines.append(f"Negative prompt: {row['negative_prompt']}")
    fields = [f"Steps: {row['steps']}", f"Sampler: {SAMPLER_LABELS[row['sampler']]}",
              f"CFG scale: {row['guidance']}", f"Seed: {row['seed']}", f"Size: {size[0]}x{size[1]}",
              f"Model hash: {sha256[:10]}", f"Model: {MODEL_NAME}"]
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


def _describe(gen: LoadedGenerator, request: GenerationRequest) -> tuple[dict, dict, dict | None]:
    """The model, sampler settings and editing inputs of a request, as generation.yaml records them."""
    model = {"run": str(gen.run_dir.resolve()), "run_manifest_sha256": gen.run_manifest_sha256,
             "checkpoint": str(gen.checkpoint.relative_to(gen.run_dir)), "step": gen.step, "sha256": gen.sha256,
             "text_encoder": gen.model.text_encoder.id}
    settings = {"sampler": request.sampler, "steps": request.steps, "guidance": request.guidance,
                "negative_prompt": request.negative_prompt, "seed": request.seed, "n": request.n,
                "time_grid": "uniform, 1 -> 0", "batch_size": request.batch_size}
    edit = None
    if request.init_image is not None:
        edit = {"init_image": str(request.init_image), "init_image_sha256": sha256_file(request.init_image),
                "strength": request.strength, "mask": str(request.mask) if request.mask else None,
                "mask_sha256": sha256_file(request.mask) if request.mask else None}
    return model, settings, edit


def _truncated_prompts(gen: LoadedGenerator, prompts: list[str], warn: Callable[[str], None]) -> dict[str, int]:
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


def generate(gen: LoadedGenerator, request: GenerationRequest, out_dir: Path | None = None, overwrite: bool = False,
             progress: Callable[[int], None] = lambda n: None, warn: Callable[[str], None] | None = None,
             inputs: list[tuple[str, Path]] = ()) -> dict:
    """Run `request` and write the generation dir at `out_dir` (default: a new
    generations/YYYYmmdd-HHMMSS), atomically: complete or absent. `inputs`: other files the request
    was read from (a prompt file), which the output must not replace. Returns the summary `--json`
    prints."""
    request = request.resolved(gen.cfg)
    warn = warn or (lambda m: print(m, file=sys.stderr))
    inputs = [("run dir", gen.run_dir), *inputs] + [
        (name, path) for name, path in (("--init-image", request.init_image), ("--mask", request.mask)) if path]
    with _claim(None if out_dir is None else Path(out_dir), overwrite, inputs, warn) as claimed:
        return _generate(gen, request, claimed, progress, warn)


def _generate(gen: LoadedGenerator, request: GenerationRequest, out_dir: Path, progress, warn) -> dict:
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
            images = sample_images(gen.model, [p for p, _ in batch], [s for _, s in batch], gen.image_shape,
                                   steps=request.steps, guidance=request.guidance, sampler=request.sampler,
                                   negative_prompts=[request.negative_prompt] * len(batch), edit=edit,
                                   autocast=gen.autocast, device=gen.device)
            pixels = to_uint8(images).cpu()  # waits for the device
            sample_s += time.perf_counter() - t0
            for index, (prompt, seed), image in zip(range(first, first + len(batch)), batch, pixels):
                row = {"file": file_name(index, prompt), "prompt": prompt,
                       "negative_prompt": request.negative_prompt, "seed": seed, "steps": request.steps,
                       "guidance": request.guidance, "sampler": request.sampler}
                if edit_info:
                    row["strength"] = request.strength
                if prompt in truncated:
                    row["truncated"] = {"tokens": truncated[prompt], "context": gen.model.text_encoder.context_length}
                metadata = {**row, "index": index, "width": width, "height": height, "model_sha256": gen.sha256,
                            "run": model_info["run"], "checkpoint_step": gen.step,
                            "text_encoder": model_info["text_encoder"], **(edit_info or {}),
                            "vgen_version": __version__}
                write_png(tmp / row["file"], image, parameters_text(row, (width, height), gen.sha256), metadata)
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
