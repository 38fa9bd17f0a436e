"""Load any trained run for inference: run.yaml -> its family, built from the recorded config, with
the EMA weights of the chosen checkpoint.

    load_run(run_dir, checkpoint, device, precision)   -> LoadedRun (family + EMA model, ready to sample)
    run_text_encoder_source(run_dir)                    the text encoder a run was conditioned on

`vgen generate` and `vgen evaluate` go through here and never name a family; training code never
imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vgen import adaptation, checkpoint as ckpt
from vgen.errors import ManifestError, UsageError
from vgen.manifest import read_manifest, sha256_file

RUN_MANIFEST = "run.yaml"


@dataclass
class LoadedRun:
    """A run's family and EMA model in eval mode, and what identifies them."""

    family: object  # a vgen.families.base.Family, built from the run's config
    model: torch.nn.Module  # the family's EMA target with the checkpoint's EMA weights
    cfg: object  # the run's config (text_encoder.source resolved)
    run_dir: Path
    run_manifest_sha256: str
    checkpoint: Path
    step: int
    sha256: str  # of the checkpoint's ema.safetensors: the "model hash"
    device: torch.device
    precision: str  # fp32 | bf16 (autocast)
    load_seconds: float
    codec: dict | None = None  # the latent codec it draws through, as training recorded it (None: pixels)
    adapter: dict | None = None  # an adapter run: its base (run, step, sha256) and the scale it draws at

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.family.image_shape

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _not_a_run(run_dir: Path) -> ManifestError:
    hint = ""
    if (run_dir / "dataset.yaml").is_file():
        hint = " (it holds dataset.yaml: that is a dataset made by `vgen preprocess`)"
    elif (run_dir / "generation.yaml").is_file():
        hint = " (it holds generation.yaml: that is an output of `vgen generate`)"
    return ManifestError(f"{run_dir}: not a run dir: no {RUN_MANIFEST}{hint}; expected the --out directory "
                         "of `vgen train`")


def resolve_text_source(source: str, run_dir: Path, manifest: dict, manifest_path: Path) -> str:
    """A relative path in `text_encoder.source` is relative to the directory training ran in."""
    from vgen.text.sources import LOCAL_DIR_PREFIX, RUN_PREFIX

    return resolve_recorded_source(source, "text_encoder.source", (RUN_PREFIX, LOCAL_DIR_PREFIX), run_dir, manifest,
                                   manifest_path)


def resolve_recorded_source(source: str, key: str, prefixes: tuple[str, ...], run_dir: Path, manifest: dict,
                            manifest_path: Path, repo_id_prefixes: tuple[str, ...] = ()) -> str:
    """A relative path in a recorded source (`key`, e.g. `run:demo/text-encoder`) is relative to the
    directory training ran in.

    Tried in order: the current directory, the one training recorded (`environment.cwd`), then every
    parent of the run dir (so `run:demo/text-encoder` of `demo/model` is found from anywhere).
    A source that is not a path (a pretrained tag, a hub repo id) is returned as it is; after one of
    `repo_id_prefixes`, a relative name found under none of those directories is taken for a repo id.
    """
    from vgen.text.sources import looks_like_path

    prefix = next((p for p in prefixes if source.startswith(p)), None)
    if prefix is None:
        if not looks_like_path(source):
            return source  # a pretrained tag or `random`
        prefix = ""
    # a run: source may name a checkpoint, run:DIR@STEP (what a codec records): the path is DIR
    body, at, step = source[len(prefix):].rpartition("@")
    body, suffix = (body, at + step) if at and step.isdigit() and prefix else (source[len(prefix):], "")
    path = Path(body).expanduser()
    if path.is_absolute():
        return source  # the loader names it if it is missing
    bases = [Path.cwd()]
    recorded = (manifest.get("environment") or {}).get("cwd")
    if recorded:
        bases.append(Path(recorded))
    bases += list(run_dir.resolve().parents)
    for base in bases:
        if (base / path).exists():
            return prefix + str((base / path).resolve()) + suffix
    if prefix in repo_id_prefixes and not source[len(prefix):].startswith((".", "~")):
        return source  # owner/name[/subfolder]: a repo id of the Hugging Face cache, not a path
    raise UsageError(
        f"{manifest_path}: {key} {source!r} is a path relative to the directory training ran "
        f"in, and it is neither under the current directory{', ' + recorded if recorded else ''} nor under a "
        f"parent of {run_dir}; run `vgen generate` from the directory `vgen train` ran in")


def _read_run(run_dir: Path) -> tuple[Path, dict]:
    if run_dir.name == RUN_MANIFEST and run_dir.is_file():  # the manifest itself names its run
        run_dir = run_dir.parent
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such directory (expected a run dir made by `vgen train`, holding "
                         f"{RUN_MANIFEST} and checkpoints/)")
    if not (run_dir / RUN_MANIFEST).is_file():
        raise _not_a_run(run_dir)
    return run_dir, read_manifest(run_dir / RUN_MANIFEST, "run", required=("train_kind", "config"))


def _run_config(run_dir: Path, manifest: dict):
    from vgen.families.config import recorded_train_config

    manifest_path = run_dir / RUN_MANIFEST
    cfg = recorded_train_config(manifest["config"], source=str(manifest_path))
    if hasattr(cfg, "text_encoder"):
        source = resolve_text_source(cfg.text_encoder.source, run_dir, manifest, manifest_path)
        cfg = dataclasses.replace(cfg, text_encoder=dataclasses.replace(cfg.text_encoder, source=source))
    if hasattr(cfg, "codec"):
        from vgen.codecs import REPO_ID_PREFIXES, SOURCE_PREFIXES

        # the codec training measured (e.g. run:demo/vae@2000, the checkpoint it was, not the latest now)
        recorded = (manifest.get("codec") or {}).get("source") or cfg.codec
        source = resolve_recorded_source(str(recorded), "codec", SOURCE_PREFIXES, run_dir, manifest, manifest_path,
                                         repo_id_prefixes=REPO_ID_PREFIXES)
        cfg = dataclasses.replace(cfg, codec=source)
    return cfg


def run_text_encoder_source(run_dir: str | Path) -> str | None:
    """The text encoder source a run was conditioned on, relative paths resolved (as loading does);
    None for a family without one."""
    run_dir, manifest = _read_run(Path(run_dir))
    cfg = _run_config(run_dir, manifest)
    return cfg.text_encoder.source if hasattr(cfg, "text_encoder") else None


def best_step(run_dir: Path, manifest: dict) -> int:
    """The step of the checkpoint early stopping marked best in run.yaml."""
    best = manifest.get("best")
    if not isinstance(best, dict) or not isinstance(best.get("step"), int):
        raise UsageError(f"--checkpoint best: {run_dir / RUN_MANIFEST} marks no best checkpoint (only runs with "
                         "train.early_stopping do); use 'latest' or a step number")
    return best["step"]


def _parse_checkpoint(which: str | int, run_dir: Path, manifest: dict) -> str | int:
    if isinstance(which, int) or which == "latest":
        return which
    if str(which).isdigit():
        return int(which)
    if which == "best":
        return best_step(run_dir, manifest)
    raise UsageError(f"--checkpoint: expected 'latest', 'best' or a step number, got {which!r}")


def load_run(run_dir: str | Path, checkpoint: str | int = "latest", device: str = "auto",
             precision: str = "auto", warn: Callable[[str], None] | None = None,
             purpose: str = "images", adapter_scale: float | None = None) -> LoadedRun:
    """The EMA weights of checkpoint `checkpoint` of the run at `run_dir`, in the family, networks
    and text encoder the run was trained with (all read through run.yaml).

    `purpose` images: a run that draws images (vgen generate, evaluate); captions: a run whose
    family writes captions (`caption`, vgen caption). Any other run is refused, saying what it is.

    `precision` auto: bf16 autocast on CUDA; fp32 on CPU, where bf16 would make an image depend on
    the batch it was drawn in (rounding differs with the batch shape, and 20 steps amplify it).
    """
    from vgen.distributed import resolve_device
    from vgen.families import FAMILIES, build_family, family_class

    start = time.perf_counter()
    run_dir, manifest = _read_run(Path(run_dir))
    manifest_path = run_dir / RUN_MANIFEST
    cfg = _run_config(run_dir, manifest)
    if purpose == "captions":
        if not hasattr(family_class(cfg.kind), "caption"):
            raise ManifestError(f"{manifest_path}: a {cfg.kind} run writes no captions; vgen caption needs a run "
                                f"of kind captioner (vgen train -c configs/captioner-tiny-cpu.yaml)")
        reason = None
    else:
        reason = family_class(cfg.kind).why_no_images(cfg, run_dir)
    if reason:
        from vgen.families.config import config_class

        drawing = [k for k in FAMILIES if family_class(k).why_no_images(config_class(k)(), run_dir) is None]
        raise ManifestError(f"{manifest_path}: {reason} (kinds that draw as configured by default: "
                            f"{', '.join(drawing)})")
    which = _parse_checkpoint(checkpoint, run_dir, manifest)
    path, state = ckpt.resolve_checkpoint(run_dir, which, warn=warn or (lambda m: print(m, file=sys.stderr)))
    torch_device = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if torch_device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"--precision: expected auto, fp32 or bf16, got {precision!r}")

    resolution = (manifest.get("dataset") or {}).get("resolution")
    family = build_family(cfg, resolution, torch_device)
    family.restore(manifest, str(manifest_path))
    adapter_keys = adaptation.prepare_inference(cfg, family, manifest, str(manifest_path))  # an adapter's base
    if adapter_scale is not None and adapter_keys is None:
        raise UsageError(f"--adapter-scale: {run_dir} is not an adapter run (its config has no `adapter:`)")
    model = family.ema_target()
    trained_with = (manifest.get("export") or {}).get("text_encoder")
    if trained_with and trained_with != getattr(getattr(model, "text_encoder", None), "id", trained_with):
        raise ManifestError(f"{manifest_path}: the run was trained with text encoder {trained_with}, but "
                            f"text_encoder.source {cfg.text_encoder.source} now holds {model.text_encoder.id}; the "
                            "generator only understands the features of the encoder it was trained with")
    try:
        tensors = ckpt.load_tensors(path, "ema", torch_device)
        if adapter_keys is None:
            model.load_state_dict(tensors)
        else:
            adaptation.load_adapter_tensors(model, tensors, adapter_keys, str(path / "ema.safetensors"))
            if adapter_scale is not None:
                adaptation.scale_adapter(model, adapter_scale)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[0]
        raise ManifestError(f"{path / 'ema.safetensors'} does not fit the network of {manifest_path}: "
                            f"{detail}") from None
    model.eval().requires_grad_(False)
    return LoadedRun(family=family, model=model, cfg=cfg, run_dir=run_dir, run_manifest_sha256=sha256_file(manifest_path),
                     checkpoint=path, step=int(state["step"]), sha256=state["files"]["ema"]["sha256"],
                     device=torch_device, precision=precision, load_seconds=time.perf_counter() - start,
                     codec=manifest.get("codec"),
                     adapter=None if adapter_keys is None else
                     {"base": {k: manifest["init"][k] for k in ("run", "step", "weights", "checkpoint_sha256")},
                      "scale": 1.0 if adapter_scale is None else adapter_scale})
