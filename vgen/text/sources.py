"""Where open_clip weights come from, and how a vgen CLIP run hands its model to other stages.

`text_encoder.source` names one of:

- an open_clip pretrained tag for `arch` (e.g. `laion2b_s34b_b79k`): read from the local Hugging Face
  cache without touching the network when it is there; downloaded by open_clip when it is not and
  the machine is online; a clear `MissingDependencyError` (not a long network timeout) otherwise;
- a local `.safetensors` file holding a full open_clip CLIP state dict for `arch`;
- `local-dir:PATH`, open_clip's own folder format (`open_clip_config.json` + weights);
- `run:PATH`, the run dir of a `vgen train` CLIP run (its run.yaml names the exported local-dir);
- `random`: `arch`, randomly initialised with a fixed seed (tests, ablations).

All weights are read with safetensors (or open_clip's `weights_only=True` loader for a cached
pretrained `.bin`), never with an unrestricted `torch.load`: a weights file must not be able to run code.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from vgen.atomic import atomic_directory
from vgen.config import bounded, check_bounds
from vgen.errors import ManifestError, MissingDependencyError, UsageError, VgenError
from vgen.manifest import read_manifest, resolve_inside, sha256_file
from vgen.text.hub import cached_hub_file, hf_hub_cache_dir, hub_file_candidates, offline

LOCAL_DIR_PREFIX = "local-dir:"
RUN_PREFIX = "run:"
RANDOM_SOURCE = "random"
RANDOM_SEED = 0  # `random` is a fixed function of `arch`, so its id names one set of weights
EXPORT_FORMAT = "open_clip-local-dir"  # `export.format` in the run.yaml of a CLIP run
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip's preferred name in a local-dir / hub repo

_HOW_TO_PROVIDE = (
    "To provide the weights, either\n"
    "  - on a machine with internet access run\n"
    "      python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"\n"
    "    and copy its Hugging Face cache ({cache}) to this machine (or point HF_HUB_CACHE / "
    "text_encoder.cache_dir at the copy), or\n"
    "  - set text_encoder.source to a local .safetensors file of a full open_clip state dict for "
    "'{arch}', a 'local-dir:PATH' folder, or 'run:PATH' of a `vgen train` CLIP run (kind: clip)."
)


@dataclass
class TextEncoderConfig:
    """`text_encoder:` in a training config."""

    arch: str = "ViT-B-32"  # open_clip.list_models(); local-dir:/run: sources carry their own
    # pretrained tag | FILE.safetensors | local-dir:PATH | run:PATH | random
    source: str = "laion2b_s34b_b79k"
    mode: Literal["frozen", "lora", "full"] = "frozen"
    lora_rank: int = bounded(8, ge=1)
    lora_alpha: float = bounded(8.0, gt=0)
    cache_dir: str | None = None  # Hugging Face hub cache; default: HF_HUB_CACHE, else $HF_HOME/hub

    def __post_init__(self) -> None:
        check_bounds(self)
        if not self.source:
            raise ValueError("source must not be empty")


@dataclass
class LoadedClip:
    """An open_clip model (eval mode) and what identifies its weights."""

    model: Any  # open_clip.CLIP or open_clip.CustomTextCLIP
    model_cfg: dict
    id: str  # e.g. "ViT-B-32/laion2b_s34b_b79k", "local-dir:0123456789ab"; keys text-embedding caches
    weights_sha256: str | None
    open_clip_name: str  # what open_clip.get_tokenizer() takes for this model: arch or "local-dir:PATH"


def load_open_clip(cfg: TextEncoderConfig) -> LoadedClip:
    """Load the open_clip model `cfg` names, in eval mode on the CPU."""
    source = cfg.source
    if source.startswith(RUN_PREFIX):
        return _load_local_dir(_run_export_dir(Path(source[len(RUN_PREFIX):])))
    if source.startswith(LOCAL_DIR_PREFIX):
        return _load_local_dir(Path(source[len(LOCAL_DIR_PREFIX):]))
    model_cfg = _arch_config(cfg.arch)
    if source == RANDOM_SOURCE:
        return _load_random(cfg.arch, model_cfg)
    if looks_like_path(source):
        return _load_file(cfg.arch, model_cfg, Path(source))
    return _load_pretrained_tag(cfg, model_cfg)


# --- architecture and tag lookup ---------------------------------------------------------------


def _closest_first(name: str, options: list[str]) -> list[str]:
    close = difflib.get_close_matches(name, options, n=5, cutoff=0.4)
    return close + [o for o in options if o not in close]


def _listing(name: str, options: list[str], limit: int = 12) -> str:
    ordered = _closest_first(name, options)
    shown = ", ".join(ordered[:limit])
    return shown + (f", ... ({len(ordered)} in all)" if len(ordered) > limit else "")


def _arch_config(arch: str) -> dict:
    import open_clip

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise UsageError(
            f"text_encoder.arch: unknown open_clip architecture '{arch}'. "
            f"Known: {_listing(arch, open_clip.list_models())}"
        )
    return model_cfg


def looks_like_path(source: str) -> bool:
    # Tags are short identifiers (letters, digits, '_', '-'); anything with a path separator or a
    # file suffix is meant as a file, so a typo in a path is reported as a missing file, not a tag.
    return "/" in source or os.sep in source or source.endswith((".safetensors", ".bin", ".pt", ".pth"))


# --- pretrained tags ---------------------------------------------------------------------------


def _load_pretrained_tag(cfg: TextEncoderConfig, model_cfg: dict) -> LoadedClip:
    import open_clip

    arch, tag = cfg.arch, cfg.source
    pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f"Pretrained tags for '{arch}': {_listing(tag, tags)}" if tags else (
            f"'{arch}' has no pretrained tags in open_clip {open_clip.__version__}"
        )
        raise UsageError(
            f"text_encoder.source: '{tag}' is not a pretrained tag of '{arch}' nor a file path. {known}. "
            "Other sources: FILE.safetensors, local-dir:PATH, run:PATH, random."
        )
    cache_dir = hf_hub_cache_dir(cfg.cache_dir)
    hf_hub = pretrained_cfg.get("hf_hub", "")
    cached = cached_hub_file(*hub_file_candidates(hf_hub), cache_dir) if hf_hub else None
    if cached is None:
        how_to = _HOW_TO_PROVIDE.format(arch=arch, tag=tag, cache=cache_dir)
        if offline():
            raise MissingDependencyError(
                f"text encoder weights '{arch}/{tag}' are not in the Hugging Face cache ({cache_dir}) "
                f"and this machine is offline.\n{how_to}"
            )
        try:  # online: open_clip downloads into the cache as usual
            model = open_clip.create_model(
                arch, pretrained=tag, cache_dir=str(cache_dir), pretrained_text=False
            )
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            raise MissingDependencyError(f"could not download '{arch}/{tag}': {e}\n{how_to}") from e
        cached = cached_hub_file(*hub_file_candidates(hf_hub), cache_dir) if hf_hub else None
    else:
        _warn_quick_gelu_mismatch(arch, tag, model_cfg, pretrained_cfg)
        # A file path as `pretrained` makes open_clip load exactly that file: no hub call at all.
        with _quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=cached, pretrained_text=False)
    return LoadedClip(
        model=model.eval(),
        model_cfg=model_cfg,
        id=f"{arch}/{tag.lower().replace('-', '_')}",  # as open_clip normalises tags
        weights_sha256=sha256_file(cached) if cached else None,
        open_clip_name=arch,
    )


def _warn_quick_gelu_mismatch(arch: str, tag: str, model_cfg: dict, pretrained_cfg: dict) -> None:
    # open_clip warns about this when it resolves a tag itself; loading the cached file by path
    # would skip the check, and a QuickGELU mismatch silently degrades every feature.
    if bool(model_cfg.get("quick_gelu", False)) != bool(pretrained_cfg.get("quick_gelu", False)):
        warnings.warn(
            f"'{arch}/{tag}' was trained with quick_gelu={pretrained_cfg.get('quick_gelu', False)} but "
            f"'{arch}' uses quick_gelu={model_cfg.get('quick_gelu', False)}; use the matching "
            "'-quickgelu' architecture",
            UserWarning,
            stacklevel=3,
        )


# --- local files -------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger warnings ("Model initialized randomly") that are expected here."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _create_without_weights(arch: str):
    import open_clip

    with _quiet_open_clip():
        # pretrained_text/image=False: never fetch tower weights (HF text towers would download)
        return open_clip.create_model(arch, pretrained=None, pretrained_text=False, pretrained_image=False)


def _load_random(arch: str, model_cfg: dict) -> LoadedClip:
    import torch

    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG stream
        torch.manual_seed(RANDOM_SEED)
        model = _create_without_weights(arch)
    return LoadedClip(model.eval(), model_cfg, f"{arch}/random", None, arch)


def _load_file(arch: str, model_cfg: dict, path: Path) -> LoadedClip:
    from open_clip.factory import load_checkpoint

    if not path.is_file():
        raise UsageError(
            f"text_encoder.source: {path}: no such file (expected a .safetensors state dict for '{arch}')"
        )
    if path.suffix != ".safetensors":
        raise UsageError(
            f"text_encoder.source: {path}: only .safetensors weights are read (pickled checkpoints can run "
            "code when loaded). Convert it with safetensors.torch.save_file(state_dict, 'model.safetensors')."
        )
    model = _create_without_weights(arch)
    try:
        # open_clip's loader: safetensors for this suffix, its legacy-key conversions, strict=True
        load_checkpoint(model, str(path), strict=True)
    except Exception as e:  # noqa: BLE001 - safetensors header errors, missing/unexpected keys, shapes
        raise UsageError(_state_dict_mismatch(path, arch, model, e)) from None
    sha = sha256_file(path)
    return LoadedClip(model.eval(), model_cfg, f"{arch}/file:{sha[:12]}", sha, arch)


def _state_dict_mismatch(path: Path, arch: str, model, error: Exception) -> str:
    from safetensors import safe_open

    head = f"text_encoder.source: {path} is not a full open_clip state dict for arch '{arch}'"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001
        return f"{head}: cannot read it as safetensors ({e})"
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        return f"{head}: {'; '.join(parts)}. Is text_encoder.arch right?"
    first = str(error).strip().splitlines()
    return f"{head}: {first[-1] if first else error}. Is text_encoder.arch right?"


def _local_dir_weights(directory: Path) -> Path:
    from open_clip.factory import _find_checkpoint_in_dir

    # The file open_clip.create_model("local-dir:...") will pick, so the hash names what is loaded.
    chosen = _find_checkpoint_in_dir(directory)
    if chosen is None:
        raise UsageError(
            f"{directory}: no weights file in this open_clip local-dir (expected {WEIGHTS_NAME})"
        )
    if not chosen.endswith(".safetensors"):
        raise UsageError(
            f"{chosen}: only .safetensors weights are read (pickled checkpoints can run code when loaded); "
            f"save the state dict as {directory / WEIGHTS_NAME}"
        )
    return Path(chosen)


def _load_local_dir(directory: Path) -> LoadedClip:
    import open_clip

    directory = directory.expanduser().resolve()
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise UsageError(
            f"text_encoder.source: {directory}: no such directory (expected an open_clip local-dir)"
        )
    try:
        model_cfg = json.loads(config_path.read_text(encoding="utf-8"))["model_cfg"]
    except FileNotFoundError:
        raise UsageError(
            f"{config_path}: missing; an open_clip local-dir holds {CONFIG_NAME} and weights"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{config_path}: not an open_clip config with a 'model_cfg' mapping ({e})") from None
    weights = _local_dir_weights(directory)
    name = LOCAL_DIR_PREFIX + str(directory)
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(name, pretrained_text=False, pretrained_image=False)
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/TypeError here
        raise UsageError(f"{directory}: open_clip cannot load this local-dir: {e}") from None
    sha = sha256_file(weights)
    return LoadedClip(model.eval(), model_cfg, f"{LOCAL_DIR_PREFIX}{sha[:12]}", sha, name)


def _run_export_dir(run_dir: Path) -> Path:
    manifest_path = run_dir / "run.yaml"
    run = read_manifest(manifest_path, "run", required=("export.format", "export.path"))
    export = run["export"]
    if export["format"] != EXPORT_FORMAT:
        raise ManifestError(
            f"{manifest_path}: export.format is {export['format']!r}; a text encoder needs a CLIP run "
            f"(format '{EXPORT_FORMAT}')"
        )
    return resolve_inside(run_dir, export["path"], f"{manifest_path}: export.path")


# --- export ------------------------------------------------------------------------------------


def save_open_clip_local_dir(model, model_cfg: dict, out_dir: str | os.PathLike) -> Path:
    """Write `model` as an open_clip local-dir that `open_clip.create_model("local-dir:" + out_dir)` loads.

    Written atomically (a finished directory or none); an existing `out_dir` is replaced.
    """
    import torch
    from open_clip import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg
    from safetensors.torch import save_file

    state = model.state_dict()
    if any(".parametrizations." in key for key in state):
        raise VgenError(
            "the model still has parametrizations (LoRA?); merge them (vgen.lora.merge_lora) first"
        )
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one buffer)
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        storages.add(storage)
        tensors[key] = tensor

    vision_size = model_cfg.get("vision_cfg", {}).get("image_size", PreprocessCfg.size)
    try:  # set by open_clip.create_model; a model built as CLIP(**cfg) has only the defaults
        model_preprocess = _plain(get_model_preprocess_cfg(model))
    except AttributeError:
        model_preprocess = {}
    preprocess_cfg = {**_plain(asdict(PreprocessCfg(size=vision_size))), **model_preprocess}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def _plain(cfg: dict) -> dict:
    """JSON-ready copy of a preprocess cfg (tuples become lists)."""
    return json.loads(json.dumps(dict(cfg)))
