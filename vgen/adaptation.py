"""Where a run's weights start and which of them train: `init.from`, adapters and `freeze`.

    init:    {from: run:RUN_DIR[@STEP], weights: ema | raw}   start from an earlier run of the same
                                                             kind and network (a new optimizer and schedule)
    adapter: {type: lora, rank, alpha, targets}               train only LoRA factors on the generator's
                                                             projections; the base is init.from
    freeze:  {params: [globs], train_last_blocks: N}          parameters that do not train

An adapter run saves only what it trains (its checkpoints' ema.safetensors is the adapter file) and
rebuilds the rest from its base, which run.yaml pins by path, step and the sha256 of the base
checkpoint's checkpoint.yaml (that file holds the sha256 of every weight file). A base may itself be
an adapter run ("re-fine-tune as new data arrives"): its weights are its own base's, recursively,
with its LoRA merged in (vgen.lora.merge_lora_tensors).

Used by the training loop (vgen.train.loop) and by inference (vgen.runs); it knows no family by name:
the adapter goes on the family's `ema_target()` (the generator), the rest of `family.model` (a GAN's
discriminator) trains in full.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vgen import checkpoint as ckpt
from vgen.errors import ConfigError, ManifestError, UsageError, VgenError
from vgen.lora import add_lora, merge_lora_tensors, set_lora_scale
from vgen.manifest import read_manifest, sha256_file

RUN_MANIFEST = "run.yaml"
RUN_PREFIX = "run:"
_MAX_DEPTH = 16  # adapter runs on adapter runs: a longer chain is surely a cycle


def parse_init_source(text: str, key: str = "init.from") -> tuple[Path, str | int]:
    """`run:RUN_DIR` or `run:RUN_DIR@STEP` -> (RUN_DIR, 'latest' or STEP)."""
    if not isinstance(text, str) or not text.startswith(RUN_PREFIX) or len(text) == len(RUN_PREFIX):
        raise ConfigError(f"{key}: expected run:RUN_DIR or run:RUN_DIR@STEP (a `vgen train` run), got {text!r}")
    body = text[len(RUN_PREFIX):]
    path, at, step = body.rpartition("@")
    if at and step.isdigit() and path:
        return Path(path), int(step)
    return Path(body), "latest"


def _prefix_of(root: nn.Module, sub: nn.Module) -> str:
    """The state-dict prefix of `sub` inside `root` ('' when it is the root)."""
    for name, module in root.named_modules():
        if module is sub:
            return f"{name}." if name else ""
    raise ValueError("the EMA target is not part of the family's model")


def _run_manifest(run_dir: Path, key: str) -> dict:
    if not (run_dir / RUN_MANIFEST).is_file():
        raise ConfigError(f"{key}: {run_dir} is not a run dir (no {RUN_MANIFEST}); expected the --out directory "
                          "of an earlier `vgen train`")
    return read_manifest(run_dir / RUN_MANIFEST, "run", required=("config",))


def recorded_init(run_dir: Path) -> dict | None:
    """The `init` record of the run.yaml in `run_dir` (a run being resumed), if any."""
    if not (run_dir / RUN_MANIFEST).is_file():
        return None
    record = read_manifest(run_dir / RUN_MANIFEST, "run").get("init")
    return record if isinstance(record, dict) else None


def describe_source(text: str, weights: str, kind: str, key: str = "init.from", warn=None) -> dict:
    """The record of `init.from` that run.yaml keeps: the run (absolute path), the step that
    `latest` meant when training started, which weights, and the checkpoint's sha256."""
    from vgen.ui import warn as ui_warn

    warn = warn or ui_warn
    run_dir, which = parse_init_source(text, key)
    manifest = _run_manifest(run_dir, key)
    source_kind = (manifest["config"] or {}).get("kind", "flow") if isinstance(manifest["config"], dict) else None
    if source_kind != kind:
        raise ConfigError(f"{key}: {run_dir} is a {source_kind} run; this config trains {kind}, and a run can only "
                          "start from a run of its own kind")
    try:
        path, state = ckpt.resolve_checkpoint(run_dir, which, warn=warn)
    except VgenError as e:
        raise ConfigError(f"{key}: {e}") from None
    if manifest.get("status") == "running":
        warn(f"{key}: {run_dir} is still training; its step {state['step']} may be rotated out of its checkpoints "
             "later, and this run needs it to resume (an adapter run: to draw at all). Keep that checkpoint")
    return {"source": text, "run": str(run_dir.resolve()), "step": int(state["step"]), "weights": weights,
            "checkpoint_sha256": sha256_file(path / "checkpoint.yaml")}


def source_state(record: dict, model: nn.Module, ema_target: nn.Module, where: str,
                 depth: int = 0) -> dict[str, torch.Tensor]:
    """The full state dict of `model` held by the run `record` describes (describe_source): its
    raw weights, with the EMA target's replaced by the averaged ones when weights is ema; for an
    adapter run, its base's weights with its own tensors (LoRA merged) on top."""
    from vgen.families.config import recorded_train_config

    if depth > _MAX_DEPTH:
        raise ManifestError(f"{where}: init.from runs chain more than {_MAX_DEPTH} deep (a cycle?)")
    run_dir = Path(record["run"])
    path = run_dir / ckpt.CHECKPOINT_DIR / ckpt.checkpoint_name(int(record["step"]))
    if not (path / "checkpoint.yaml").is_file():
        raise ManifestError(f"{where}: the start weights {path} are gone (init.from {record.get('source')}); "
                            "the run cannot be rebuilt without them")
    if sha256_file(path / "checkpoint.yaml") != record.get("checkpoint_sha256"):
        raise ManifestError(f"{where}: {path} is not the checkpoint this run started from (its checkpoint.yaml "
                            "sha256 differs from the one recorded)")
    ckpt.read_checkpoint(path)  # every file against its sha256
    tensors = ckpt.load_tensors(path, "model")
    if record.get("weights", "ema") == "ema":
        prefix = _prefix_of(model, ema_target)
        tensors.update({prefix + k: v for k, v in ckpt.load_tensors(path, "ema").items()})
    manifest = _run_manifest(run_dir, where)
    cfg = recorded_train_config(manifest["config"], str(run_dir / RUN_MANIFEST))
    if cfg.adapter is None:
        return tensors
    base = manifest.get("init")
    if not isinstance(base, dict) or "run" not in base:
        raise ManifestError(f"{run_dir / RUN_MANIFEST}: an adapter run without the `init` record of its base")
    base_tensors = source_state(base, model, ema_target, str(run_dir / RUN_MANIFEST), depth + 1)
    try:
        return merge_lora_tensors(base_tensors, tensors, cfg.adapter.alpha / cfg.adapter.rank)
    except ValueError as e:
        raise ManifestError(f"{path}: {e}") from None


def load_exactly(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load a full state dict, naming the first tensor that is missing, extra or of another shape."""
    expected = module.state_dict()
    for key, value in expected.items():
        if key not in tensors:
            raise ConfigError(f"{where}: has no tensor {key!r}, which this config's network has; the source "
                              "is of another network (compare its run.yaml's config)")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ConfigError(f"{where}: tensor {key!r} is {tuple(tensors[key].shape)} there but "
                              f"{tuple(value.shape)} in this config's network")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise ConfigError(f"{where}: holds tensor {extra[0]!r}, which this config's network lacks"
                          f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    module.load_state_dict(tensors)


def _freeze(family, freeze) -> None:
    named = dict(family.model.named_parameters())
    for pattern in freeze.params:
        hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(list(named)[:4])
            raise ConfigError(f"freeze.params: {pattern!r} matches no parameter (names look like {sample}, ...)")
        for name in hits:
            named[name].requires_grad_(False)
    if freeze.train_last_blocks is not None:
        lists = [(n, m) for n, m in family.ema_target().named_modules()
                 if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] == "blocks"]
        if len(lists) != 1:
            raise ConfigError(f"freeze.train_last_blocks: the generator has {len(lists)} lists named `blocks` "
                              f"({', '.join(n for n, _ in lists) or 'none'}), so 'the last N blocks' is not "
                              "defined for it; freeze by freeze.params globs instead")
        blocks = lists[0][1]
        for block in list(blocks)[:max(0, len(blocks) - freeze.train_last_blocks)]:
            block.requires_grad_(False)


@dataclass
class Adaptation:
    """What `setup` did: the init record for run.yaml, and for adapter runs the keys that
    checkpoints hold (the trained tensors; the rest comes from the base)."""

    record: dict | None
    source_manifest: dict | None  # the run.yaml of the run it starts from (read when the run starts fresh)
    model_keys: list[str] | None  # None: checkpoints hold every tensor
    ema_keys: list[str] | None
    frozen: int  # parameters that do not train (the start line reports them)

    def file_metadata(self, cfg) -> dict[str, dict[str, str]] | None:
        """What an adapter run's weight files say about themselves in their safetensors header: the
        adapter and its base (run, step, sha256 of the base checkpoint's checkpoint.yaml)."""
        if self.model_keys is None or cfg.adapter is None:
            return None
        about = {"format": "vgen-lora-adapter", "rank": str(cfg.adapter.rank), "alpha": str(cfg.adapter.alpha),
                 "base_run": str(self.record["run"]), "base_step": str(self.record["step"]),
                 "base_weights": str(self.record["weights"]),
                 "base_checkpoint_sha256": str(self.record["checkpoint_sha256"])}
        return {"model": about, "ema": about}

    def saved(self, tensors: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
        keys = self.model_keys if which == "model" else self.ema_keys
        return tensors if keys is None else {k: tensors[k] for k in keys}

    def load(self, module: nn.Module, tensors: dict[str, torch.Tensor], which: str, where: str) -> None:
        keys = self.model_keys if which == "model" else self.ema_keys
        if keys is None:
            module.load_state_dict(tensors)
        else:
            load_adapter_tensors(module, tensors, keys, where)


def load_adapter_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], keys: list[str] | None,
                         where: str) -> None:
    """Load an adapter run's tensors over a module that holds its base: exactly `keys` (when given),
    and nothing outside the module's state dict."""
    present = module.state_dict()
    extra = [k for k in tensors if k not in present]
    missing = [k for k in keys or [] if k not in tensors]
    if extra or missing:
        what = f"holds {extra[0]!r}, which the adapted network lacks" if extra else f"lacks {missing[0]!r}"
        raise ManifestError(f"{where}: {what}; it does not fit the run's adapter")
    try:
        module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ManifestError(f"{where}: {str(e).strip().splitlines()[-1].strip()}; it does not fit the run's adapter") from None


def _add_adapter(family, adapter) -> None:
    target = family.ema_target()
    try:
        add_lora(target, adapter.rank, adapter.alpha, adapter.targets)
    except ValueError as e:
        raise ConfigError(f"adapter.targets: {e}") from None


def _check_adapter(cfg, family) -> None:
    """An adapter adapts a generator, alone: refuse what it would silently undo."""
    if cfg.adapter is None:
        return
    if cfg.init.source is None:
        raise ConfigError("adapter: an adapter trains on top of a base model; set init.from: run:BASE_RUN "
                          "(or --init-from)")
    reason = type(family).why_no_images(cfg, Path("."))
    if reason:
        raise ConfigError(f"adapter: adapters are for generators, and this {cfg.kind} run is not one ({reason})")
    mode = getattr(getattr(cfg, "text_encoder", None), "mode", "frozen")
    if mode != "frozen":
        raise ConfigError(f"adapter: the adapter is the only thing an adapter run trains; text_encoder.mode is "
                          f"{mode!r} (set it to frozen, or train without adapter:)")
    if cfg.freeze.params or cfg.freeze.train_last_blocks is not None:
        raise ConfigError("freeze: an adapter run freezes the whole generator already (only the LoRA factors "
                          "train); narrow adapter.targets instead")


def _check_text_encoder(family, manifest: dict, key: str) -> None:
    """A generator understands only the text features it was trained on."""
    trained_with = (manifest.get("export") or {}).get("text_encoder")
    current = getattr(getattr(family.ema_target(), "text_encoder", None), "id", None)
    if trained_with and current and trained_with != current:
        raise ConfigError(f"{key}: the source was trained with text encoder {trained_with}, but this config's "
                          f"text_encoder.source gives {current}; set the source's text_encoder.source")


def setup(cfg, family, previous: dict | None, resuming: bool, say=print, describe=None) -> Adaptation:
    """Before the EMA copy and the optimizers are made: load the start weights (a fresh run, or an
    adapter run's base every time), freeze, add the adapter. `previous`: the init record of the
    run.yaml being resumed (a resumed run keeps the step `latest` meant when it started).
    `describe(work)`: runs `work` once (on the main process) and gives every process its result, so
    that all of them start from the same step of a source that is still training."""
    init, adapter = cfg.init, cfg.adapter
    _check_adapter(cfg, family)
    record = source_manifest = None
    if init.source is not None:
        same = previous and previous.get("source") == init.source and previous.get("weights") == init.weights
        if resuming and same:
            record = previous
        else:
            record = (describe or (lambda work: work()))(lambda: describe_source(init.source, init.weights, cfg.kind))
            source_manifest = _run_manifest(Path(record["run"]), "init.from")
            _check_text_encoder(family, source_manifest, "init.from")
        if not resuming or adapter is not None:
            where = f"init.from {init.source} (step {record['step']}, {init.weights} weights)"
            load_exactly(family.model, source_state(record, family.model, family.ema_target(), where), where)
            if not resuming:
                say(f"starting from {record['run']} step {record['step']} ({init.weights} weights)")
    _freeze(family, cfg.freeze)
    if adapter is not None:
        _add_adapter(family, adapter)
    frozen = sum(p.numel() for p in family.model.parameters() if not p.requires_grad)
    model_keys = ema_keys = None
    if adapter is not None:
        target = family.ema_target()
        prefix = _prefix_of(family.model, target)
        own = {prefix + k for k in target.state_dict()}
        learned = {n for n, p in family.model.named_parameters() if p.requires_grad}
        # The adapted generator: only what trains; anything else of the model (a GAN's D): all of it.
        model_keys = [k for k in family.model.state_dict() if k not in own or k in learned]
        ema_keys = [k[len(prefix):] for k in model_keys if k in own]
    return Adaptation(record, source_manifest, model_keys, ema_keys, frozen)


def inherit_prepared(family, prepared: dict, adapted: Adaptation, own_manifest: Path | None) -> dict:
    """A run from another works in that run's model space: what the family measured on the data
    before training (a latent codec's shift and scale) is taken from the source's run.yaml when
    the run starts, and from its own (which recorded the source's) when it resumes. The family's
    `restore` checks the codec is the same one (its sha256)."""
    if adapted.record is None or not prepared:
        return prepared
    recorded = adapted.source_manifest if own_manifest is None else read_manifest(own_manifest, "run")
    family.restore(recorded, str(own_manifest or Path(adapted.record["run"]) / RUN_MANIFEST))
    return {key: recorded.get(key, value) for key, value in prepared.items()}


def prepare_inference(cfg, family, manifest: dict, where: str) -> list[str] | None:
    """Inference on an adapter run: its base's weights and the LoRA structure in `family`, so that
    the checkpoint's ema.safetensors (only the adapter) loads on top. Returns the adapter's keys
    (None for any other run: its EMA file holds every tensor)."""
    if cfg.adapter is None:
        return None
    record = manifest.get("init")
    if not isinstance(record, dict) or "run" not in record:
        raise ManifestError(f"{where}: an adapter run without the `init` record of its base")
    load_exactly(family.model, source_state(record, family.model, family.ema_target(), where), where)
    _add_adapter(family, cfg.adapter)  # (an adapter run freezes nothing else: _check_adapter refuses freeze)
    return [n for n, p in family.ema_target().named_parameters() if p.requires_grad]  # the factors


def scale_adapter(model: nn.Module, factor: float) -> None:
    """--adapter-scale: 0 draws as the base, 1 as trained."""
    if not set_lora_scale(model, factor):
        raise UsageError("--adapter-scale: the run has no adapter (it is not an `adapter:` run)")
