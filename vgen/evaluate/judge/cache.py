"""The trained judge, cached on disk under a key of its code, settings and Twemoji files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgen.atomic import atomic_directory
from vgen.errors import ManifestError, MissingDependencyError
from vgen.evaluate.judge.calibration import calibrate
from vgen.evaluate.judge.network import classifier
from vgen.evaluate.judge.settings import CROP, MARGIN, NOUNS, RESOLUTION, JudgeSettings
from vgen.evaluate.judge.training import train_network
from vgen.evaluate.judge.verdicts import Judge, Verdict
from vgen.evaluate.twemoji import TwemojiSet, load_twemoji
from vgen.manifest import read_manifest, sha256_file, write_manifest

JUDGE_VERSION = 2  # bump when a change to this package changes the trained weights
WEIGHTS_FILE = "judge.safetensors"
MANIFEST_FILE = "judge.yaml"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgen" / "judge"


def cache_key(settings: JudgeSettings, twemoji: TwemojiSet) -> str:
    # The code is part of the key too: a change to how the judge is trained never reuses old weights.
    source = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()
    blob = json.dumps({"judge_version": JUDGE_VERSION, "source_sha256": source,
                       "settings": dataclasses.asdict(settings), "twemoji_sha256": twemoji.sha256},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """Tuples as lists, for yaml.safe_dump."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _load_cached(folder: Path) -> Judge:
    from safetensors.torch import load_file

    info = read_manifest(folder / MANIFEST_FILE, "judge", required=("id", "weights.sha256"))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or sha256_file(weights) != info["weights"]["sha256"]:
        raise ManifestError(f"{weights}: missing or does not match the sha256 in {folder / MANIFEST_FILE}")
    model = classifier()
    model.load_state_dict(load_file(weights))
    info["source"] = "cache"
    info["path"] = str(folder)
    return Judge(model, info)


def _calibration_or_reason(judge: Judge, settings: JudgeSettings) -> dict[str, Any]:
    try:
        return calibrate(judge, settings.calibration_scenes)
    except MissingDependencyError as e:  # no Noto font: the judge still works, its trust is unknown
        return {"unavailable": str(e)}


def load_judge(cache_dir: str | os.PathLike | None = None, twemoji_dir: str | os.PathLike | None = None,
               settings: JudgeSettings | None = None, log: Callable[[str], None] | None = None) -> Judge:
    """The judge from the cache, or trained (about a minute on CPU), calibrated and cached first.

    Raises MissingDependencyError when the Twemoji package is not installed.
    """
    from safetensors.torch import save_file

    log = log or (lambda message: None)
    settings = settings or JudgeSettings()
    twemoji = load_twemoji(twemoji_dir)
    key = cache_key(settings, twemoji)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / f"judge-{key[:16]}"
    stale = False
    if (folder / MANIFEST_FILE).is_file():
        try:
            return _load_cached(folder)
        except (ManifestError, OSError, RuntimeError, ValueError) as e:
            log(f"judge: ignoring the cached judge in {folder} ({e}); training again")
            stale = True
    start = time.perf_counter()
    # One thread: this network is too small to gain much from more, and on a shared, busy 2-core
    # machine training with two threads once took 10 min instead of 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, precision = train_network(twemoji, settings, log)
    finally:
        torch.set_num_threads(threads)
    train_seconds = round(time.perf_counter() - start, 1)
    info: dict[str, Any] = {
        "id": f"emoji-scenes-judge:twemoji-{twemoji.version}:{key[:12]}",
        "judge_version": JUDGE_VERSION,
        "classes": list(NOUNS),
        "trained_on": {"package": "emoji-datasource-twitter", "version": twemoji.version,
                       "license": "CC BY 4.0 (Twemoji graphics)", "files_sha256": twemoji.sha256,
                       "folder": str(twemoji.folder)},
        "input": {"resolution": RESOLUTION, "crop": CROP, "margin_px": MARGIN},
        "settings": _plain(dataclasses.asdict(settings)),
        "train_seconds": train_seconds,
        "torch": {"version": str(torch.__version__), "threads": 1, "precision": precision},
        "cache_key": key,
    }
    judge = Judge(model, info)
    log("judge: calibrating on Noto scenes")
    info["calibration"] = _calibration_or_reason(judge, settings)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    try:
        with atomic_directory(folder, overwrite=stale) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE))
            info["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(tmp / WEIGHTS_FILE)}
            write_manifest(tmp / MANIFEST_FILE, "judge", info)
    except FileExistsError:  # another process cached the same judge meanwhile: use that one
        return _load_cached(folder)
    info["source"] = "trained"
    info["path"] = str(folder)
    return judge


def judge_images(images: torch.Tensor | np.ndarray, prompts: Sequence[str], judge: Judge | None = None,
                 cache_dir: str | os.PathLike | None = None) -> list[Verdict]:
    """Verdicts for uint8 images [N,3,H,W] against their prompts (loading or training the judge)."""
    return (judge or load_judge(cache_dir)).judge(images, prompts)
