"""Checkpoints: safetensors for every tensor, one small YAML for the rest, written atomically.

    RUN/checkpoints/step-00001000/
        model.safetensors       trained weights
        ema.safetensors         EMA weights (what generation uses)
        optimizer.safetensors   the AdamW moments and step counts of every phase's optimizer, keyed
                                "<phase>.state.<param index>.<name>"
        checkpoint.yaml         step, images seen, counters, hyper-parameters of each optimizer's
                                groups (`optimizer_groups: {phase: [...]}`), sha256 of the three files

A checkpoint directory is built under a temporary name and renamed, so a crash (even SIGKILL)
never leaves a half-written checkpoint that looks valid; on resume, the newest checkpoint whose
files match their recorded hashes wins. No pickle anywhere: checkpoints are safe to load.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vgen.atomic import atomic_directory
from vgen.errors import IntegrityError, ManifestError, VgenError
from vgen.manifest import read_manifest, resolve_inside, sha256_file, write_manifest

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def optimizer_tensors(optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split the optimizers' state dicts into flat tensors (safetensors) and plain group settings
    (YAML), each under its phase's name."""
    tensors, groups = {}, {}
    for phase, optimizer in optimizers.items():
        state = optimizer.state_dict()
        for index, entries in state["state"].items():
            for name, value in entries.items():
                tensors[f"{phase}.state.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        groups[phase] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                         for g in state["param_groups"]]
    return tensors, groups


def load_optimizer_tensors(optimizers: dict[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
                           groups: dict | list, where: str = "checkpoint") -> None:
    """Restore each phase's optimizer. A checkpoint of vgen before phases (one optimizer, keys
    without a phase, `optimizer_groups` a list) restores a family of one phase."""
    if isinstance(groups, list):
        if len(optimizers) != 1:
            raise ManifestError(f"{where}: holds one optimizer, but this family has {len(optimizers)} phases")
        (phase,) = optimizers
        groups, tensors = {phase: groups}, {f"{phase}.{k}": v for k, v in tensors.items()}
    if not isinstance(groups, dict) or set(groups) != set(optimizers):
        raise ManifestError(f"{where}: holds optimizers for phases {sorted(groups) if isinstance(groups, dict) else groups}, "
                            f"expected {sorted(optimizers)}")
    for phase, optimizer in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"{phase}.state."
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, name = key[len(prefix):].split(".", 1)
                state.setdefault(int(index), {})[name] = value
        phase_groups = [dict(g) for g in groups[phase]]
        for group in phase_groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": phase_groups})


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep: int,
                    protect: tuple[int, ...] = (), metadata: dict[str, dict[str, str]] | None = None) -> Path:
    """Write checkpoint `step` (tensors: file stem -> state dict) and keep only the newest `keep`,
    besides those of the steps in `protect` (the best one). `metadata`: file stem -> the strings
    its safetensors header carries (an adapter file names its base)."""
    root = run_dir / CHECKPOINT_DIR
    path = root / checkpoint_name(step)
    with atomic_directory(path, overwrite=True) as tmp:
        files = {}
        for stem, sd in tensors.items():
            save_file(_contiguous(sd), str(tmp / f"{stem}.safetensors"), metadata=(metadata or {}).get(stem))
            files[stem] = {"file": f"{stem}.safetensors", "sha256": sha256_file(tmp / f"{stem}.safetensors")}
        write_manifest(tmp / "checkpoint.yaml", "checkpoint", {"step": step, **state, "files": files})
    kept = {checkpoint_name(s) for s in protect}
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, oldest first (by step, not by modification time)."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path, verify: bool = True) -> dict:
    """The checkpoint's YAML state; with `verify`, check every file against its sha256
    (IntegrityError naming every damaged one: the others, e.g. intact EMA weights, may be rescued)."""
    where = str(path / "checkpoint.yaml")
    state = read_manifest(path / "checkpoint.yaml", "checkpoint", required=("step", "files"))
    if not isinstance(state["files"], dict):
        raise ManifestError(f"{where}: `files` must map names to {{file, sha256}}")
    if verify:
        damaged = []
        for entry in state["files"].values():
            file = resolve_inside(path, entry.get("file") if isinstance(entry, dict) else None, where)
            if not file.is_file():
                damaged.append(f"{file.name} (missing)")
            elif sha256_file(file) != entry.get("sha256"):
                damaged.append(f"{file.name} (sha256 differs)")
        if damaged:
            raise IntegrityError(f"{path}: {', '.join(damaged)}: does not match checkpoint.yaml")
    return state


def load_tensors(path: Path, stem: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    file = path / f"{stem}.safetensors"
    try:
        return load_file(str(file), device=str(device))
    except FileNotFoundError:
        raise ManifestError(f"{file}: missing from the checkpoint") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError: header or size invalid
        if type(e).__name__ != "SafetensorError":
            raise
        raise IntegrityError(f"{file}: not a readable safetensors file ({e}); the checkpoint is damaged") from None


def latest_checkpoint(run_dir: Path, warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; damaged ones are reported and passed over."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_checkpoint(path)
        except VgenError as e:
            warn(f"skipping damaged checkpoint {path}: {e}")
    return None


def damaged_checkpoints(run_dir: Path) -> dict[Path, str]:
    """Every checkpoint of the run that does not verify, with what is wrong with it."""
    damaged = {}
    for path in list_checkpoints(run_dir):
        try:
            read_checkpoint(path)
        except VgenError as e:
            damaged[path] = str(e)
    return damaged


def set_aside(run_dir: Path, paths: list[Path]) -> Path:
    """Move checkpoints out of the way (never delete them) into RUN/set-aside-N/, so a run can start
    over without destroying weights that may still be rescued."""
    k = 1
    while (run_dir / f"set-aside-{k}").exists():
        k += 1
    target = run_dir / f"set-aside-{k}"
    target.mkdir()
    for path in paths:
        path.rename(target / path.name)
    return target


def resolve_checkpoint(run_dir: Path, which: str | int = "latest", warn=print) -> tuple[Path, dict]:
    """`latest` or a step number -> (path, state); a clear error when there is none."""
    if which == "latest":
        found = latest_checkpoint(run_dir, warn=warn)
        if found is None:
            raise ManifestError(f"{run_dir}: no valid checkpoint under {CHECKPOINT_DIR}/")
        return found
    path = run_dir / CHECKPOINT_DIR / checkpoint_name(int(which))
    if not path.is_dir():
        steps = [int(_NAME.match(p.name).group(1)) for p in list_checkpoints(run_dir)]
        raise ManifestError(f"{run_dir}: no checkpoint for step {which}; available steps: {steps or 'none'}")
    return path, read_checkpoint(path)
