"""What a run directory must hold before `vgen train` writes to it: claimed under a lock, the
same config and dataset when it is resumed, and checkpoints that can be resumed from."""

from __future__ import annotations

import contextlib
from pathlib import Path

from vgen import checkpoint as ckpt
from vgen.config import to_dict
from vgen.data.dataset import dataset_content_sha256, dataset_sha256
from vgen.errors import ConfigError, IntegrityError, ManifestError, UsageError, VgenError
from vgen.families.config import recorded_train_config
from vgen.manifest import read_manifest, write_manifest
from vgen.outputs import OutputLock, check_not_an_input, check_output_dir
from vgen.ui import warn

RUN_MANIFEST = "run.yaml"
METRICS_FILE = "metrics.jsonl"
# Settings that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.sample_every", "train.val_every", "train.val_images", "train.compile"}



def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_same_run(run_dir: Path, resolved: dict, data_dir: Path) -> None:
    """Refuse to resume a run dir with a different config or dataset: the result would be neither
    run. A dataset may move, or be rebuilt from the same files: the same content is the same data.
    The recorded config is read back through the schema first, so a key that a later vgen added
    (with its default) is no change."""
    previous = read_manifest(run_dir / RUN_MANIFEST, "run", required=("config",))
    if not isinstance(previous["config"], dict) or not isinstance(previous.get("dataset") or {}, dict):
        raise ManifestError(f"{run_dir / RUN_MANIFEST}: `config` and `dataset` must be mappings")
    recorded = previous["config"]
    if recorded.get("kind", "flow") == resolved["kind"]:
        with contextlib.suppress(VgenError):  # a config this vgen cannot read is compared as it is
            recorded = to_dict(recorded_train_config(recorded, str(run_dir / RUN_MANIFEST)))
    old, new = _flatten(recorded), _flatten(resolved)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"{run_dir} holds a run with a different config ({details}); "
                          "use a new --out directory, or the same config to resume")
    dataset = previous.get("dataset") or {}
    # Runs of vgen before content_sha256 recorded only the manifest's hash.
    recorded, current = (dataset.get("content_sha256"), dataset_content_sha256(data_dir)) \
        if dataset.get("content_sha256") else (dataset.get("manifest_sha256"), dataset_sha256(data_dir))
    if recorded and recorded != current:
        raise UsageError(f"--data {data_dir}: {run_dir} was trained on another dataset "
                         f"({dataset.get('path')}, sha256 {str(recorded)[:12]}…); resume it "
                         "with that --data, or train on this one into a new --out directory")


def check_checkpoints(run_dir: Path, start_over: bool) -> None:
    """When a run dir has checkpoints and none of them verifies, resuming would silently start from
    step 0 and prune them: refuse, or with `start_over` set them aside (never delete them). Damaged
    ones newer than the one resumed are set aside too: left in place, pruning by step would keep
    them and delete the good ones."""
    present = ckpt.list_checkpoints(run_dir)
    if not present:
        return
    damaged = ckpt.damaged_checkpoints(run_dir)
    if damaged and not start_over and len(damaged) < len(present):
        aside = ckpt.set_aside(run_dir, list(damaged))
        warn(f"moved {len(damaged)} damaged checkpoints to {aside} ({'; '.join(damaged.values())}); resuming from "
             "the newest intact one")
    elif start_over:
        aside = ckpt.set_aside(run_dir, present)
        for name in (METRICS_FILE,):
            if (run_dir / name).exists():
                (run_dir / name).rename(aside / name)
        warn(f"--start-over: moved {len(present)} checkpoints and {METRICS_FILE} to {aside}; training from step 0")
    elif len(damaged) == len(present):
        details = "; ".join(damaged.values())
        raise IntegrityError(f"{run_dir}: every checkpoint is damaged, so the run cannot resume ({details}). "
                             "Nothing was changed. Train into a new --out directory, or pass --start-over to "
                             f"train from step 0 here (the damaged checkpoints are moved to {run_dir}/set-aside-N/, "
                             "not deleted)")


def claim_run_dir(run_dir: Path, data_dir: Path) -> OutputLock:
    """Lock `run_dir` and check it is new, empty or a run (to resume). A run.yaml that still says
    `running` while we hold the lock belongs to a process that was killed: it is corrected first."""
    check_not_an_input(run_dir, [("dataset", data_dir)])
    lock = OutputLock(run_dir, warn=warn).acquire()
    try:
        if check_output_dir(run_dir, RUN_MANIFEST, "run", False, existing="resume"):
            _mark_killed(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _mark_killed(run_dir: Path) -> None:
    manifest = read_manifest(run_dir / RUN_MANIFEST, "run")
    if manifest.get("status") == "running":
        body = {k: v for k, v in manifest.items() if k not in ("schema", "kind", "vgen_version", "created")}
        write_manifest(run_dir / RUN_MANIFEST, "run", {**body, "status": "interrupted",
                                                       "error": "the process training it stopped without a word "
                                                                "(killed, or the machine went down)"})
