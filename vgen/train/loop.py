"""The training loop shared by every family of models.

A *family* (vgen.families: flow, gan, clip) owns what differs between kinds: the modules, the
ordered optimisation phases and their losses, how a batch is made from global sample indices,
validation, sample grids and the export. Everything else lives here once: an AdamW with warm-up +
cosine per phase, gradient clipping, EMA of the module the family names, bf16 autocast, optional
torch.compile, DDP, checkpoints of every module and optimizer with automatic resume, signals,
non-finite losses, metrics.jsonl, run.yaml and the progress display.

Progress is counted in optimizer steps of one global batch; `images_seen = step * batch_size`.
Sample `g` of the run (a global index) is drawn, noised and captioned only from (seed, g), so a
resumed run replays exactly the samples the uninterrupted run would have seen, whatever the number
of processes.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from vgen.config import to_dict
from vgen.families import build_family
from vgen.data.dataset import (ImageCaptionDataset, dataset_content_sha256, dataset_sha256, load_dataset_manifest,
                               verify_dataset)
from vgen.errors import ConfigError, VgenError
from vgen.manifest import sha256_file, write_manifest
from vgen import adaptation, checkpoint as ckpt
from vgen.distributed import Distributed, all_reduce, barrier, broadcast_object, init_distributed, shutdown
from vgen.train.compiling import cpp_compiler, eager
from vgen.train.early_stopping import EarlyStopping
from vgen.train.ema import ema_decay, make_ema, update_ema
from vgen.train.run_dir import METRICS_FILE, RUN_MANIFEST, check_checkpoints, check_same_run, claim_run_dir
from vgen.train.precision import autocast_factory, choose_precision, enable_tf32
from vgen.train.progress import MetricsFile, TrainProgress
from vgen.randomness import SampleOrder
from vgen.train.schedule import learning_rate
from vgen.ui import console, say, warn


def _gpu_memory(device: torch.device) -> dict:
    """The peak memory allocated on a CUDA device so far (what a user sizes train.batch_size by)."""
    return {"gpu_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


def _param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings (1-D tensors), as in GPT-2/nanoGPT."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class _PhaseState:
    """A phase with what the loop keeps for it: its parameters, AdamW, DDP wrapper and log window."""

    def __init__(self, phase, single: bool):
        self.phase, self.name = phase, phase.name
        self.params = [p for p in phase.module.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"phase {phase.name!r} has no trainable parameters (freeze.params or adapter "
                              "left it nothing to train)")
        optim = phase.optim
        # The fused kernel: one pass over all parameters (on CPU 4x faster than the per-tensor loop).
        self.optimizer = torch.optim.AdamW(_param_groups(self.params, optim.weight_decay), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps, fused=True)
        self.trained = phase.module
        # A family of one phase reports `loss` and `grad_norm`; of several, `loss_<phase>`, ...
        self.suffix = "" if single else f"_{phase.name}"
        self.reset_window()

    def reset_window(self) -> None:
        self.loss_sum, self.steps, self.logs = 0.0, 0, {}

    def set_trainable(self, on: bool) -> None:
        for p in self.params:
            p.requires_grad_(on)


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        console.print(f"[yellow]{signal.Signals(signum).name}: saving a checkpoint, then stopping[/]")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg, data_dir: Path, run_dir: Path, start_over: bool = False) -> dict | None:
    """Train (or resume) a run of `cfg` on the dataset at `data_dir` into `run_dir`; returns the
    summary `vgen train --json` prints (on the main process; None on the others).

    The run dir is locked for the whole run (vgen.outputs.OutputLock, held by the main process):
    a second process on it is refused with the holder's pid and host."""
    load_dataset_manifest(data_dir)  # a --data that is no dataset is the first thing to say
    dist = init_distributed(cfg.train.device)
    lock = None
    try:
        lock = _on_main(dist, lambda: claim_run_dir(Path(run_dir), Path(data_dir)))
        summary = _train(cfg, Path(data_dir), Path(run_dir), dist, start_over)
        return summary if dist.is_main else None
    finally:
        if lock is not None:
            lock.release()
        shutdown(dist)


def _on_main(dist: Distributed, work):
    """Run `work` on the main process only; if it raises, every process raises (the others would
    otherwise wait at the next collective until torchrun kills them). Returns its result there."""
    result, error = None, None
    if dist.is_main:
        try:
            result = work()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    if all_reduce(torch.tensor(float(error is not None)), "max").item():
        raise error if error is not None else VgenError("stopped: the main process failed (its message is above)")
    return result


def _train(cfg, data_dir: Path, run_dir: Path, dist: Distributed, start_over: bool) -> dict:
    loop, device = cfg.train, dist.device
    if loop.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size {loop.batch_size} is not divisible by the {dist.world_size} processes")
    local_batch = loop.batch_size // dist.world_size
    resolved = to_dict(cfg)
    _on_main(dist, lambda: verify_dataset(data_dir))  # hashed once, not by every process at the same time
    train_set = ImageCaptionDataset(data_dir, "train", verify=False)
    val_set = ImageCaptionDataset(data_dir, "val", verify=False)
    if len(val_set) == 0:
        val_set = train_set
    if (run_dir / RUN_MANIFEST).exists():
        check_same_run(run_dir, resolved, data_dir)
    _on_main(dist, lambda: check_checkpoints(run_dir, start_over))
    enable_tf32(device)

    torch.manual_seed(loop.seed)  # the initial weights; DDP broadcasts rank 0's anyway
    family = build_family(cfg, train_set.resolution, device)
    prepared = family.prepare(train_set, val_set, lambda work: _on_main(dist, work))
    model = family.model
    found = ckpt.latest_checkpoint(run_dir, warn=warn)
    # init.from / adapter / freeze (vgen.adaptation), before the EMA copy and the optimizers exist
    adapted = adaptation.setup(cfg, family, adaptation.recorded_init(run_dir), resuming=found is not None,
                               say=say if dist.is_main else (lambda *a, **k: None),
                               describe=lambda work: broadcast_object(_on_main(dist, work)))
    # A run from another works in that run's space: its codec's recorded shift and scale, not new ones.
    prepared = adaptation.inherit_prepared(family, prepared, adapted, run_dir / RUN_MANIFEST if found else None)
    ema_target = family.ema_target()
    ema = make_ema(ema_target, share=family.shared_modules())
    phases = family.phases()
    states = [_PhaseState(phase, single=len(phases) == 1) for phase in phases]
    # The phases that train the EMA target: the EMA is updated on a step where all of them stepped.
    ema_ids = {id(p) for p in ema_target.parameters()}
    ema_owners = [s for s in states if any(id(p) in ema_ids for p in s.params)]
    optimizers = {state.name: state.optimizer for state in states}

    start_step, nonfinite, precision, precision_reason, stopping_state = 0, 0, None, None, None
    if found is not None:
        path, state = found
        adapted.load(model, ckpt.load_tensors(path, "model", device), "model", str(path / "model.safetensors"))
        adapted.load(ema, ckpt.load_tensors(path, "ema", device), "ema", str(path / "ema.safetensors"))
        ckpt.load_optimizer_tensors(optimizers, ckpt.load_tensors(path, "optimizer", device), state["optimizer_groups"],
                                    where=str(path / "checkpoint.yaml"))
        start_step, nonfinite, precision = state["step"], state["nonfinite"], state["precision"]
        stopping_state = state.get("early_stopping")
        precision_reason = "the precision of the checkpoint resumed"
        if dist.is_main:
            say(f"resuming from {path} (step {start_step}, {state['images_seen']:,} images seen)")
    if precision is None:
        precision, precision_reason = choose_precision(loop.precision, device, family.matmul_width)
        # Every process must train in the same precision: bf16 only if all of them support it.
        bf16_everywhere = all_reduce(torch.tensor(float(precision != "bf16")), "max").item() == 0
        if precision == "bf16" and not bf16_everywhere:
            precision, precision_reason = "fp32", "auto: another process's device does not run bf16 natively"
    autocast = autocast_factory(device, precision)
    stopper = None
    if loop.early_stopping is not None:
        stopper = EarlyStopping(loop.early_stopping, stopping_state)
        # Which metrics the family reports, before any time is spent (a validation as any other).
        _on_main(dist, lambda: stopper.check_metric(family.validate(model, ema, val_set, loop.val_images, autocast)))

    if loop.compile:
        if device.type == "cpu" and not cpp_compiler():
            console.print("[yellow]train.compile: torch.compile needs a C++ compiler on CPU and none was found "
                          "(install g++, or set CXX); training without it[/]")
        else:
            family.compile()  # in place: parameter names (and so checkpoints) do not change
    if dist.enabled:
        for state in states:
            state.trained = DistributedDataParallel(state.phase.module,
                                                    device_ids=[device.index] if device.type == "cuda" else None)
    order = SampleOrder(loop.seed, len(train_set))

    def manifest(status: str, step: int, export: dict | None = None, error: str | None = None) -> None:
        if not dist.is_main:
            return
        body = {
            "train_kind": cfg.kind,
            "status": status,
            **({"error": error} if error else {}),
            "config": resolved,
            "dataset": {"path": str(data_dir.resolve()), "manifest_sha256": dataset_sha256(data_dir),
                        "content_sha256": dataset_content_sha256(data_dir), "resolution": train_set.resolution, "train_images": len(train_set)},
            "environment": {"torch": str(torch.__version__), "python": platform.python_version(),
                            "device": str(device), "world_size": dist.world_size, "precision": precision,
                            "precision_reason": precision_reason, "threads": torch.get_num_threads(),
                            # relative paths in the config (text_encoder.source) are relative to this
                            "cwd": str(Path.cwd())},
            "progress": {"step": step, "steps": loop.steps, "images_seen": step * loop.batch_size,
                         "nonfinite_skipped": nonfinite},
            "checkpoints": [{"step": int(p.name.split("-")[1]), "path": str(p.relative_to(run_dir)),
                             "sha256": sha256_file(p / "checkpoint.yaml")} for p in ckpt.list_checkpoints(run_dir)],
            **prepared,  # what the family measured on the data before training (e.g. its codec's latent scale)
            **({"init": adapted.record} if adapted.record else {}),  # the run it started from
        }
        if stopper is not None and stopper.best():
            body["best"] = stopper.best()  # vgen generate --checkpoint best
        if early_stopped:
            body["early_stopped"] = early_stopped
        if export:
            body["export"] = export
        write_manifest(run_dir / RUN_MANIFEST, "run", body)

    def save(step: int) -> None:
        if dist.is_main:
            tensors, groups = ckpt.optimizer_tensors(optimizers)
            state = {"images_seen": step * loop.batch_size, "nonfinite": nonfinite, "precision": precision,
                     "optimizer_groups": groups, **({"early_stopping": stopper.state()} if stopper else {})}
            ckpt.save_checkpoint(run_dir, step, {"model": adapted.saved(model.state_dict(), "model"),
                                                 "ema": adapted.saved(ema.state_dict(), "ema"),
                                                 "optimizer": tensors}, state, loop.keep_checkpoints,
                                 protect=(stopper.best_step,) if stopper and stopper.best_step is not None else (),
                                 metadata=adapted.file_metadata(cfg))
            manifest("running", step)
        barrier()

    early_stopped = None  # {step, best_step, ...} once early stopping ends the run
    if stopper is not None and stopper.should_stop:  # resumed after it stopped early: nothing left to train
        early_stopped = {"step": start_step, "best_step": stopper.best_step, "metric": stopper.cfg.metric,
                         "patience": stopper.cfg.patience}
    manifest("running", start_step)
    step, metrics, export, last = start_step, None, None, {}
    try:
        metrics = MetricsFile(run_dir / METRICS_FILE, start_step) if dist.is_main else None
        if dist.is_main:
            (run_dir / "samples").mkdir(exist_ok=True)
            n_params = sum(p.numel() for state in states for p in state.params)
            frozen = f" ({adapted.frozen / 1e6:.2f}M frozen)" if adapted.frozen else ""
            console.print(f"training {cfg.kind}: {n_params / 1e6:.2f}M trainable parameters{frozen}, {len(train_set):,} "
                          f"images, batch {loop.batch_size} on {dist.world_size} x {device}, {precision} "
                          f"({precision_reason})", highlight=False)
        if loop.steps == 0 and found is None:
            save(0)  # train.steps=0: the initialised network (EMA = weights), e.g. the baseline of an evaluation
        window_start, window_images = time.perf_counter(), 0
        with _StopRequest() as stop, TrainProgress(dist.is_main, start_step, loop.steps) as progress:
            while step < loop.steps and early_stopped is None:
                first = step * loop.batch_size + dist.rank * local_batch
                batch = family.make_batch(train_set, order, step, list(range(first, first + local_batch)))
                skipped, grad_norms = [], {}
                for state in states:
                    optim = state.phase.optim
                    lr = learning_rate(step, loop.steps, optim.lr, optim.warmup_steps, optim.min_lr_ratio)
                    for group in state.optimizer.param_groups:
                        group["lr"] = lr
                    if len(states) > 1:  # only this phase's parameters collect gradients
                        for other in states:
                            other.set_trainable(other is state)
                    with autocast():
                        loss, logs = state.phase.loss(state.trained, batch, step)
                    finite = bool(all_reduce(torch.isfinite(loss.detach()).logical_not().float(), "max").item() == 0)
                    grad_norm = torch.tensor(float("nan"))
                    if finite:
                        loss.backward()
                        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, optim.grad_clip)
                        finite = bool(torch.isfinite(grad_norm))
                    if finite:
                        state.loss_sum, state.steps = state.loss_sum + loss.detach().float(), state.steps + 1
                        for key, value in logs.items():  # a scalar is averaged over the steps that logged it
                            total, count = state.logs.get(key, (0.0, 0))
                            state.logs[key] = (total + value.detach().float(), count + 1)
                        state.optimizer.step()
                    else:
                        skipped.append(state)
                    state.optimizer.zero_grad(set_to_none=True)
                    grad_norms[f"grad_norm{state.suffix}"] = float(grad_norm)
                if len(states) > 1:
                    for state in states:
                        state.set_trainable(True)
                if not any(s in skipped for s in ema_owners):
                    update_ema(ema, ema_target, ema_decay(step, cfg.ema.decay, cfg.ema.warmup))
                if skipped:
                    nonfinite += 1
                    if dist.is_main:
                        what = "step" if len(states) == 1 else "phase " + ", ".join(s.name for s in skipped) + " of the step"
                        console.print(f"[yellow]step {step}: non-finite loss or gradient, {what} skipped "
                                      f"({nonfinite} of at most {loop.max_nonfinite})[/]")
                    if nonfinite > loop.max_nonfinite:
                        raise VgenError(f"{nonfinite} steps had a non-finite loss or gradient (limit train.max_nonfinite="
                                        f"{loop.max_nonfinite}); lower optim.lr or check the data. The last good "
                                        f"checkpoint is in {run_dir / ckpt.CHECKPOINT_DIR}")
                step += 1
                window_images += loop.batch_size

                if step % loop.log_every == 0 or step == loop.steps:
                    row = {}
                    for state in states:
                        n = max(1, state.steps)  # a window of skipped steps only: NaN, not a loss of 0
                        mean = state.loss_sum / n if state.steps else float("nan")
                        row[f"loss{state.suffix}"] = all_reduce(torch.as_tensor(mean), "mean").item()
                        for key, (total, count) in state.logs.items():
                            row[key] = all_reduce(torch.as_tensor(total / count), "mean").item()
                        state.reset_window()
                    elapsed = time.perf_counter() - window_start
                    rate = window_images / elapsed if elapsed > 0 else 0.0
                    if dist.is_main:
                        last["train"] = {"step": step, "images_seen": step * loop.batch_size,
                                         **{k: v for k, v in row.items() if k.startswith("loss")},
                                         **{f"lr{s.suffix}": learning_rate(step - 1, loop.steps, s.phase.optim.lr,
                                                                           s.phase.optim.warmup_steps,
                                                                           s.phase.optim.min_lr_ratio) for s in states},
                                         **grad_norms, **{k: v for k, v in row.items() if not k.startswith("loss")},
                                         "images_per_s": rate, **_gpu_memory(device), "nonfinite_skipped": nonfinite,
                                         "time": time.time()}
                        metrics.write(last["train"])
                        progress(step, row, rate)
                    window_start, window_images = time.perf_counter(), 0
                if dist.is_main and (step % loop.val_every == 0 or step == loop.steps):
                    with eager():
                        measured = family.validate(model, ema, val_set, loop.val_images, autocast)
                    last["validation"] = {"step": step, "images_seen": step * loop.batch_size, **measured}
                    metrics.write(last["validation"])
                    if stopper is not None:
                        stopper.update(step, last["validation"])
                if dist.is_main and (step % loop.sample_every == 0 or step == loop.steps):
                    with eager():
                        family.write_samples(ema, run_dir / "samples" / f"step-{step:08d}.png", autocast)
                # Decided on the main process (validation runs there), acted on by every process.
                flags = all_reduce(torch.tensor([float(stop.requested), float(bool(stopper and stopper.improved)),
                                                 float(bool(stopper and stopper.should_stop))]), "max").tolist()
                stop_now, new_best, stop_early = (bool(f) for f in flags)
                if stopper is not None:
                    stopper.improved = False
                if stop_early and dist.is_main:
                    early_stopped = {"step": step, "best_step": stopper.best_step, "metric": stopper.cfg.metric,
                                     "patience": stopper.cfg.patience}
                    say(f"early stopping at step {step}: {stopper.describe()}")
                if step % loop.checkpoint_every == 0 or step == loop.steps or stop_now or new_best or stop_early:
                    save(step)
                if stop_now or stop_early:
                    break

        done = step >= loop.steps or early_stopped is not None
        if dist.is_main and done:
            export = family.export(run_dir, ema)
    except BaseException as e:
        # run.yaml must not go on saying `running`: it says how the run ended and why (when the disk
        # takes this write; on a full disk it may not, and the error then says so itself).
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        with contextlib.suppress(Exception):  # the original error is the one to report
            manifest(status, step, error="a second Ctrl-C" if status == "interrupted" else (str(e) or repr(e)))
        raise
    finally:
        if metrics:
            metrics.close()
    manifest("done" if done else "interrupted", step, export)
    if dist.is_main:
        say(f"{'finished' if done else 'stopped'} at step {step}; run: {run_dir}/{RUN_MANIFEST}", style="green")
    return {"run_dir": str(run_dir.resolve()), "manifest": str((run_dir / RUN_MANIFEST).resolve()),
            "status": "done" if done else "interrupted", "kind": cfg.kind, "step": step, "steps": loop.steps,
            "images_seen": step * loop.batch_size, "precision": precision, "nonfinite_skipped": nonfinite,
            "done": done, "last": last,
            "checkpoints": [str(p.resolve()) for p in ckpt.list_checkpoints(run_dir)], "export": export}
