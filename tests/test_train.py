"""`vgen train`: a model that learns, resume that reproduces bit for bit, DDP that matches one
process, checkpoints, signals and config errors. Runs the real CLI in subprocesses where the
behaviour under test is the process's (exit codes, SIGKILL, torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train_fixtures import COLOURS, colour_dataset, tiny_text_encoder
from vgen.checkpoint import list_checkpoints
from vgen.families.base import SampleSettings
from vgen.families.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

TINY_FLOW = [
    "kind=flow", "flow.network.image_size=16", "flow.network.patch_size=4", "flow.network.width=64",
    "flow.network.depth=2", "flow.network.heads=2", "flow.sample_prompts=[red, blue]", "flow.sample_seeds=2",
    "flow.sample_steps=8", "train.batch_size=16", "train.log_every=5", "train.val_images=16",
    "train.precision=fp32", "optim.warmup_steps=5",
]


def flow_sets(assets, steps: int, checkpoint_every: int | None = None, every: int = 100000) -> list[str]:
    """The tiny flow config with the tests' text encoder, `steps` steps, validation and samples
    every `every` steps and checkpoints every `checkpoint_every` (default: only at the end)."""
    return [*TINY_FLOW, f"text_encoder.source=local-dir:{assets['text']}", f"train.steps={steps}",
            f"train.checkpoint_every={checkpoint_every or steps}", f"train.val_every={every}",
            f"train.sample_every={every}"]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-assets")
    return {"data": colour_dataset(root), "text": tiny_text_encoder(root), "root": root}


def write_config(path: Path, sets: list[str]) -> Path:
    """A config file from dotted `key=value` lines (the same syntax as --set)."""
    from vgen.config import apply_overrides

    path.write_text(yaml.safe_dump(apply_overrides({}, sets)))
    return path


def vgen_train_cmd(config: Path, data: Path, out: Path, *sets: str, torchrun: int = 0) -> list[str]:
    launcher = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc_per_node={torchrun}", "-m", "vgen"] \
        if torchrun else [sys.executable, "-m", "vgen"]
    cmd = [*launcher, "train", "--config", str(config), "--data", str(data), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def kill_after_checkpoints(cmd: list[str], out: Path, count: int) -> None:
    """Start a training command and SIGKILL it once `out` holds `count` checkpoints."""
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(out)) < count:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_resume_after_sigkill_is_bit_identical(config: Path, data: Path, tmp_path: Path) -> Path:
    """Train `config` straight, and again SIGKILLed after its second checkpoint and resumed: the
    final weights, EMA and optimizer state are equal bit for bit. Returns the resumed run dir."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(vgen_train_cmd(config, data, straight)).returncode == 0
    cmd = vgen_train_cmd(config, data, killed)
    kill_after_checkpoints(cmd, killed, 2)
    assert 0 < len(list_checkpoints(killed)), "no checkpoint before the kill"
    resumed = run(cmd)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    for stem in ("model", "ema", "optimizer"):
        a, b = final_weights(straight, stem), final_weights(killed, stem)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stem, k)
    return killed


def assert_two_processes_match_one(config: Path, data: Path, tmp_path: Path, rtol: float = 1e-3) -> Path:
    """Train `config` in one process and under torchrun in two; every weight within `rtol`
    (relative). Returns the two-process run dir."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(vgen_train_cmd(config, data, one)).returncode == 0
    result = run(vgen_train_cmd(config, data, two, torchrun=2))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_weights(one), final_weights(two)
    for k in a:
        rel = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)
        assert rel < rtol, (k, float(rel))
    return two


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=REPO)


def final_weights(run_dir: Path, stem: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / f"{stem}.safetensors"))


@pytest.mark.slow
def test_flow_learns_colour_names(assets, tmp_path):
    """A colour name -> a square of that colour: after a short training the EMA samples for each
    prompt have the named colour in the middle and white at the border."""
    from vgen.families.flow import FlowFamily

    config = write_config(tmp_path / "c.yaml", [*TINY_FLOW, f"text_encoder.source=local-dir:{assets['text']}",
                                                "train.steps=400", "train.batch_size=32", "optim.lr=2e-3",
                                                "train.checkpoint_every=400", "train.sample_every=400",
                                                "train.val_every=100", "ema.decay=0.99"])
    out = tmp_path / "run"
    result = run(vgen_train_cmd(config, assets["data"], out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # the loss falls
    assert (out / "samples" / "step-00000400.png").is_file()

    cfg = load_train_config(config)
    task = FlowFamily(cfg, 16, torch.device("cpu"))
    task.model.load_state_dict(final_weights(out, "ema"))
    names = list(COLOURS)
    images = task.sample(task.model, names, list(range(len(names))), SampleSettings(steps=20, guidance=3.0, sampler="euler"),
                         lambda: torch.autocast("cpu", enabled=False), "cpu")
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    for name, image in zip(names, images):
        centre = image[:, 6:10, 6:10].mean(dim=(1, 2))
        nearest = names[int((palette - centre).norm(dim=1).argmin())]
        assert nearest == name, (name, centre)
        assert image[:, 0, :].mean() > 0.6  # white border row


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(assets, tmp_path):
    config = write_config(tmp_path / "c.yaml", flow_sets(assets, 40, checkpoint_every=5, every=20))
    killed = assert_resume_after_sigkill_is_bit_identical(config, assets["data"], tmp_path)
    manifest = yaml.safe_load((killed / "run.yaml").read_text())
    assert manifest["status"] == "done" and manifest["progress"]["step"] == 40
    assert len(list_checkpoints(killed)) == 3  # keep_checkpoints


@pytest.mark.slow
def test_torchrun_two_processes_match_one(assets, tmp_path):
    sets = flow_sets(assets, 12)
    config = write_config(tmp_path / "c.yaml", sets)
    two = assert_two_processes_match_one(config, assets["data"], tmp_path)
    assert yaml.safe_load((two / "run.yaml").read_text())["environment"]["world_size"] == 2


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_0(assets, tmp_path):
    sets = flow_sets(assets, 100000)
    config = write_config(tmp_path / "c.yaml", sets)
    out = tmp_path / "run"
    proc = subprocess.Popen(vgen_train_cmd(config, assets["data"], out), env=child_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    assert manifest["status"] == "interrupted"
    step = manifest["progress"]["step"]
    assert step > 0 and list_checkpoints(out)[-1].name == f"step-{step:08d}"


def test_config_errors_exit_2(assets, tmp_path, vgen_cli):
    config = write_config(tmp_path / "c.yaml", [*TINY_FLOW, f"text_encoder.source=local-dir:{assets['text']}"])
    args = ("train", "--config", config, "--data", assets["data"], "--out", tmp_path / "r")
    typo = vgen_cli(*args, "--set", "train.stpes=3")
    assert typo.exit_code == 2 and "train.stpes" in typo.stderr and "train.steps" in typo.stderr
    bad_type = vgen_cli(*args, "--set", "train.steps=many")
    assert bad_type.exit_code == 2 and "train.steps" in bad_type.stderr
    size = vgen_cli(*args, "--set", "flow.network.image_size=32")
    assert size.exit_code == 2 and "image_size" in size.stderr and "16" in size.stderr
    missing = vgen_cli("train", "--config", tmp_path / "nope.yaml", "--data", assets["data"], "--out", tmp_path / "r")
    assert missing.exit_code == 2 and "nope.yaml" in missing.stderr
    not_data = vgen_cli("train", "--config", config, "--data", tmp_path, "--out", tmp_path / "r")
    assert not_data.exit_code == 2 and "dataset.yaml" in not_data.stderr
    assert "Traceback" not in typo.stderr + size.stderr + missing.stderr


def test_changed_config_refuses_to_resume(assets, tmp_path, vgen_cli):
    sets = flow_sets(assets, 2)
    config = write_config(tmp_path / "c.yaml", sets)
    args = ("train", "--config", config, "--data", assets["data"], "--out", tmp_path / "r")
    assert vgen_cli(*args).exit_code == 0
    changed = vgen_cli(*args, "--set", "optim.lr=0.5")
    assert changed.exit_code == 2 and "optim.lr" in changed.stderr
    longer = vgen_cli(*args, "--set", "train.steps=4")  # more steps of the same run is a resume
    assert longer.exit_code == 0 and "resuming" in longer.stderr


def test_nonfinite_steps_are_skipped_then_stop(assets, tmp_path, monkeypatch):
    from vgen.errors import VgenError
    from vgen.train import loop
    from vgen.families.flow import FlowFamily

    calls = {"n": 0}
    original = FlowFamily.loss

    def sometimes_nan(self, model, batch, step):
        calls["n"] += 1
        loss, logs = original(self, model, batch, step)
        return (loss * float("nan") if calls["n"] in (3, 4) or calls["n"] > 8 else loss), logs

    monkeypatch.setattr(FlowFamily, "loss", sometimes_nan)
    sets = [*flow_sets(assets, 20, checkpoint_every=5), "train.max_nonfinite=3"]
    cfg = load_train_config(write_config(tmp_path / "c.yaml", sets))
    with pytest.raises(VgenError, match="non-finite"):
        loop.train(cfg, assets["data"], tmp_path / "r")
    state = yaml.safe_load((list_checkpoints(tmp_path / "r")[-1] / "checkpoint.yaml").read_text())
    assert state["step"] == 5 and state["nonfinite"] == 2
    weights = final_weights(tmp_path / "r")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_clip_run_reloads_through_open_clip(assets, tmp_path):
    import open_clip

    sets = ["kind=clip", "clip.embed_dim=32", "clip.patch_size=8", "clip.vision_width=32", "clip.vision_layers=1",
            "clip.vision_head_width=16", "clip.text_width=32", "clip.text_layers=1", "clip.text_heads=2",
            "clip.context_length=8", "train.steps=30", "train.batch_size=32", "train.precision=fp32",
            "train.checkpoint_every=30", "train.val_every=30", "train.val_images=64", "optim.lr=3e-3",
            "optim.warmup_steps=5"]
    config = write_config(tmp_path / "clip.yaml", sets)
    out = tmp_path / "clip"
    result = run(vgen_train_cmd(config, assets["data"], out))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    assert manifest["export"] == {"format": "open_clip-local-dir", "path": "export"}
    model = open_clip.create_model(f"local-dir:{out / 'export'}")
    ema = final_weights(out, "ema")
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    metrics = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    top1 = [m["val_text_to_image_top1"] for m in metrics if "val_text_to_image_top1" in m][-1]
    assert top1 > 0.5  # six colour captions: chance is 1/6

    # The trained CLIP is usable as the flow's text encoder through `run:`.
    flow = write_config(tmp_path / "flow.yaml", [*TINY_FLOW, f"text_encoder.source=run:{out}", "train.steps=2",
                                                 "train.checkpoint_every=2", "train.val_every=2", "train.sample_every=2"])
    result = run(vgen_train_cmd(flow, assets["data"], tmp_path / "flow"))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_gpu_config_builds_and_steps_at_tiny_size(assets, tmp_path):
    """configs/flow-64-gpu.yaml, shrunk: the file parses, builds and takes one step on CPU."""
    out = tmp_path / "gpu"
    cmd = vgen_train_cmd(REPO / "configs" / "flow-64-gpu.yaml", assets["data"], out,
                         f"text_encoder.source=local-dir:{assets['text']}", "train.device=cpu",
                         "train.compile=false", "flow.network.image_size=16", "flow.network.width=48",
                         "flow.network.depth=1", "flow.network.heads=2", "train.batch_size=4", "train.steps=1",
                         "flow.sample_steps=2")
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load((out / "run.yaml").read_text())["config"]
    assert cfg["train"]["precision"] == "bf16" and cfg["ema"]["decay"] == 0.9999


@pytest.mark.slow
def test_compile_keeps_checkpoint_format_and_numbers(assets, tmp_path):
    """train.compile=true compiles the denoiser in place: same parameter names, nearly same weights."""
    sets = flow_sets(assets, 3)
    config = write_config(tmp_path / "c.yaml", sets)
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert run(vgen_train_cmd(config, assets["data"], plain)).returncode == 0
    result = run(vgen_train_cmd(config, assets["data"], compiled, "train.compile=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_weights(plain), final_weights(compiled)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k


def test_a_thread_count_the_user_set_is_kept(monkeypatch):
    """OMP_NUM_THREADS (two runs side by side, one thread each) wins over vgen's share of the cores."""
    import os

    from vgen.distributed import init_distributed

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: vgen's own choice is one thread too")
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        init_distributed("cpu")
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        init_distributed("cpu")
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(threads)
