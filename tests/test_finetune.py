"""Fine-tuning: start from a run (`init.from`), LoRA adapters on the generator, `freeze`, early
stopping with the best checkpoint kept. Unit tests against known answers, then the real CLI on a
tiny flow model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tests.test_train import (TINY_FLOW, assert_resume_after_sigkill_is_bit_identical, colour_dataset, final_weights,
                              run, tiny_text_encoder, vgen_train_cmd, write_config)
from vgen import checkpoint as ckpt
from vgen.adaptation import parse_init_source
from vgen.config import to_dict
from vgen.errors import ConfigError
from vgen.families.config import EarlyStoppingConfig, train_config_from_dict
from vgen.lora import add_lora, lora_state_dict, merge_lora, merge_lora_tensors, set_lora_scale
from vgen.train.early_stopping import EarlyStopping


# --- units -------------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6)) for _ in range(3)])
        self.attn = nn.Module()
        self.attn.q = nn.Linear(6, 4)
        self.conv = nn.Conv2d(2, 2, 3)


def test_lora_globs_adapt_only_matching_2d_weights():
    torch.manual_seed(0)
    net = _Net()
    add_lora(net, 2, 4.0, ["*attn.q.weight", "conv.*"])  # the conv weight matches but is 4-D: left alone
    adapted = sorted(lora_state_dict(net))
    assert adapted == ["attn.q.parametrizations.weight.0.lora_A", "attn.q.parametrizations.weight.0.lora_B"]
    with pytest.raises(ValueError, match="no 2-D parameter"):
        add_lora(_Net(), 2, 4.0, ["*nothing*"])


def test_merged_tensors_equal_the_parametrized_model_and_scale_zero_is_the_base():
    torch.manual_seed(0)
    net = _Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    add_lora(net, 2, 3.0, ["*.weight"])
    for p in net.parameters():  # B is zero at the start: give the factors a value
        if p.requires_grad:
            p.data.normal_()
    x = torch.randn(5, 6)
    adapted_out = net.attn.q(x)
    merged = merge_lora_tensors(base, lora_state_dict(net), 3.0 / 2)
    plain = _Net()
    plain.load_state_dict(merged)
    assert torch.allclose(plain.attn.q(x), adapted_out, atol=1e-6)
    # the same as folding the factors in place (vgen.lora.merge_lora)
    merge_lora(net)
    for key, value in net.state_dict().items():
        assert torch.equal(value, merged[key]), key
    # scale 0: the base model's output exactly
    torch.manual_seed(0)
    net2 = _Net()
    add_lora(net2, 2, 3.0, ["*.weight"])
    for p in net2.parameters():
        if p.requires_grad:
            p.data.normal_()
    assert set_lora_scale(net2, 0.0) == 4
    plain.load_state_dict(base)
    assert torch.equal(net2.attn.q(x), plain.attn.q(x))


def test_default_adapter_targets_reach_attention_and_mlp_of_every_generator_network():
    from vgen.families.config import DEFAULT_ADAPTER_TARGETS
    from vgen.models.ar import ArNetworkConfig, TokenTransformer
    from vgen.models.dit import DiT, DiTConfig
    from vgen.models.gan import Generator, GeneratorConfig
    from vgen.models.unet import UNet, UNetConfig

    networks = {
        "dit": DiT(DiTConfig(image_size=16, patch_size=4, width=32, depth=2, heads=2), 16, 8),
        "unet": UNet(UNetConfig(), 16, 8),
        "gan": Generator(GeneratorConfig(z_dim=8, width=32, heads=2), 16, 3, 16, 8),
        "ar": TokenTransformer(ArNetworkConfig(width=32, depth=2, heads=2, conditioning="cross"), 11, 3, text_width=16),
    }
    for name, network in networks.items():
        add_lora(network, 2, 2.0, DEFAULT_ADAPTER_TARGETS)
        adapted = {k.split(".parametrizations.")[0] for k in lora_state_dict(network)}
        assert any("attn" in k for k in adapted), name
        if name in ("dit", "ar"):  # the UNet's and the GAN's other layers are convolutions
            assert any(k.endswith(("mlp.0", "mlp.2", "gate_up", "down", "cross.q")) for k in adapted), (name, adapted)
        assert all(not p.requires_grad for n, p in network.named_parameters() if "lora_" not in n), name


def test_init_source_parsing_and_the_from_key():
    assert parse_init_source("run:runs/a") == (Path("runs/a"), "latest")
    assert parse_init_source("run:runs/a@1500") == (Path("runs/a"), 1500)
    assert parse_init_source("run:runs/a@b") == (Path("runs/a@b"), "latest")
    for bad in ("runs/a", "run:", 3):
        with pytest.raises(ConfigError, match="run:RUN_DIR"):
            parse_init_source(bad)
    cfg = train_config_from_dict({"kind": "flow", "init": {"from": "run:x@5", "weights": "raw"}})
    assert cfg.init.source == "run:x@5" and to_dict(cfg)["init"] == {"from": "run:x@5", "weights": "raw"}
    with pytest.raises(ConfigError, match="unknown key 'init.source'"):
        train_config_from_dict({"kind": "flow", "init": {"source": "run:x"}})


def test_early_stopping_counts_validations_without_improvement():
    stop = EarlyStopping(EarlyStoppingConfig(metric="val_loss", mode="min", patience=2, min_delta=0.1))
    for step, value in [(10, float("nan")), (20, 1.0), (30, 0.95), (40, 0.85), (50, 0.8)]:
        stop.update(step, {"val_loss": value})
    # nan is never best; 0.95 is not 0.1 better than 1.0; 0.85 is; 0.8 is not: one miss since
    assert (stop.best_step, stop.best_value, stop.since_best, stop.should_stop) == (40, 0.85, 1, False)
    stop.update(60, {"val_loss": 0.9})
    assert stop.should_stop and stop.best() == {"step": 40, "metric": "val_loss", "mode": "min", "value": 0.85}
    resumed = EarlyStopping(stop.cfg, stop.state())
    assert resumed.state() == stop.state() and resumed.should_stop
    up = EarlyStopping(EarlyStoppingConfig(metric="acc", mode="max", patience=1))
    up.update(1, {"acc": 0.5})
    up.update(2, {"acc": 0.6})
    assert up.best_step == 2 and not up.should_stop
    up.update(3, {"val_loss": 1.0})  # a validation without the metric: no improvement, no crash
    assert up.since_best == 1 and up.should_stop and "best 0.6 at step 2" in up.describe()
    with pytest.raises(ConfigError, match="'acc' is not a validation metric.*val_loss"):
        up.check_metric({"val_loss": 1.0})
    assert "no finite value yet" in EarlyStopping(up.cfg, {"since_best": 1}).describe()


def test_the_best_checkpoint_survives_rotation(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, {"model": {"w": torch.zeros(1)}}, {}, keep=2, protect=(2,))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000005"]


# --- the CLI on a tiny flow model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny flow run of 30 steps on the colour squares, and a config to adapt it."""
    root = tmp_path_factory.mktemp("finetune")
    data, text = colour_dataset(root), tiny_text_encoder(root)
    sets = [*TINY_FLOW, f"text_encoder.source=local-dir:{text}", "train.steps=30", "train.checkpoint_every=30",
            "train.val_every=10", "train.sample_every=1000"]
    config = write_config(root / "base.yaml", sets)
    result = run(vgen_train_cmd(config, data, root / "base"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "data": data, "sets": sets, "config": config, "run": root / "base"}


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))}


def _max_diff(a: Path, b: Path) -> int:
    x, y = _images(a), _images(b)
    assert x.keys() == y.keys() and x
    return max(int(np.abs(x[k] - y[k]).max()) for k in x)


@pytest.mark.slow
def test_lora_run_saves_only_the_adapter_and_draws_on_its_base(base, tmp_path, vgen_cli):
    config = write_config(tmp_path / "lora.yaml", [*base["sets"], "adapter.rank=4", "adapter.alpha=8",
                                                   "train.steps=20", "train.checkpoint_every=20", "optim.lr=3e-3"])
    out = tmp_path / "lora"
    result = run(vgen_train_cmd(config, base["data"], out, f"init.from=run:{base['run']}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting from" in result.stderr and "frozen" in result.stderr
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    record = manifest["init"]
    assert record["run"] == str(base["run"].resolve()) and record["step"] == 30 and record["weights"] == "ema"
    # the checkpoint holds the LoRA factors only, far smaller than the base
    adapter = load_file(str(ckpt.list_checkpoints(out)[-1] / "ema.safetensors"))
    assert adapter and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
    with safe_open(str(ckpt.list_checkpoints(out)[-1] / "ema.safetensors"), "pt") as f:  # the file names its base
        about = f.metadata()
    assert about["format"] == "vgen-lora-adapter" and about["base_checkpoint_sha256"] == record["checkpoint_sha256"]
    assert about["rank"] == "4" and about["base_run"] == record["run"]
    base_file = ckpt.list_checkpoints(base["run"])[-1] / "ema.safetensors"
    assert (ckpt.list_checkpoints(out)[-1] / "ema.safetensors").stat().st_size < 0.3 * base_file.stat().st_size

    def generate(run_dir: Path, name: str, *extra: str) -> Path:
        result = vgen_cli("generate", "red", "blue", "--run", run_dir, "-n", "2", "-o", tmp_path / name, *extra)
        assert result.exit_code == 0, result.stderr
        return tmp_path / name

    from_base, scale0, scale1 = generate(base["run"], "g-base"), generate(out, "g0", "--adapter-scale", "0"), \
        generate(out, "g1")
    assert _max_diff(scale0, from_base) == 0  # scale 0 is the base model exactly
    assert _max_diff(scale1, from_base) > 0  # the adapter changes the images
    described = yaml.safe_load((scale1 / "generation.yaml").read_text())["model"]["adapter"]
    assert described["base"]["checkpoint_sha256"] == record["checkpoint_sha256"] and described["scale"] == 1.0
    refused = vgen_cli("generate", "red", "--run", base["run"], "--adapter-scale", "0.5", "-o", tmp_path / "x")
    assert refused.exit_code == 2 and "not an adapter run" in refused.stderr

    # a run started from the adapter run (0 steps): the base with the LoRA merged in, same pixels
    merged = tmp_path / "merged"
    assert run(vgen_train_cmd(base["config"], base["data"], merged, "train.steps=0",
                              f"init.from=run:{out}")).returncode == 0
    assert _max_diff(generate(merged, "g-merged"), scale1) <= 1
    # an adapter on top of the adapter run ("re-fine-tune as new data arrives")
    again = tmp_path / "again"
    result = run(vgen_train_cmd(config, base["data"], again, "train.steps=5", f"init.from=run:{out}"))
    assert result.returncode == 0, result.stderr[-3000:]
    generate(again, "g-again")

    # the base changed under the adapter run: refused, saying so
    (ckpt.list_checkpoints(base["run"])[-1] / "checkpoint.yaml").write_text(
        (ckpt.list_checkpoints(base["run"])[-1] / "checkpoint.yaml").read_text() + "\n# edited\n")
    broken = vgen_cli("generate", "red", "--run", out, "-o", tmp_path / "y")
    assert broken.exit_code == 2 and "not the checkpoint this run started from" in broken.stderr


@pytest.mark.slow
def test_incompatible_or_missing_sources_are_refused(base, tmp_path, vgen_cli):
    config = write_config(tmp_path / "c.yaml", [*base["sets"], "flow.network.width=32"])
    result = vgen_cli("train", "-c", config, "-d", base["data"], "-o", tmp_path / "a", "--init-from", f"run:{base['run']}")
    assert result.exit_code == 2 and "network.patch.weight" in result.stderr and "(64, 48)" in result.stderr
    result = vgen_cli("train", "-c", base["config"], "-d", base["data"], "-o", tmp_path / "b",
                      "--init-from", f"run:{tmp_path / 'nothing'}")
    assert result.exit_code == 2 and "not a run dir" in result.stderr
    result = vgen_cli("train", "-c", base["config"], "-d", base["data"], "-o", tmp_path / "c",
                      "--set", "adapter.rank=2")
    assert result.exit_code == 2 and "set init.from" in result.stderr
    result = vgen_cli("train", "-c", base["config"], "-d", base["data"], "-o", tmp_path / "d",
                      "--init-from", f"run:{base['run']}@7")
    assert result.exit_code == 2 and "no checkpoint for step 7" in result.stderr
    for sets, message in [(["adapter.rank=2", "text_encoder.mode=lora"], "text_encoder.mode is 'lora'"),
                          (["adapter.rank=2", "freeze.train_last_blocks=1"], "freezes the whole generator"),
                          (["train.early_stopping.patience=2", "train.val_images=0"], "train.val_images is 0")]:
        args = [a for s in sets for a in ("--set", s)]
        result = vgen_cli("train", "-c", base["config"], "-d", base["data"], "-o", tmp_path / "e",
                          "--init-from", f"run:{base['run']}", *args)
        assert result.exit_code == 2 and message in result.stderr, (sets, result.stderr)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [True, False], ids=["lora", "full"])
def test_a_run_from_another_run_resumes_bit_identically_after_sigkill(base, tmp_path, adapter):
    sets = [*base["sets"], f"init.from=run:{base['run']}", "train.steps=40", "train.checkpoint_every=5",
            "train.val_every=20"]
    config = write_config(tmp_path / "c.yaml", sets + (["adapter.rank=4"] if adapter else []))
    killed = assert_resume_after_sigkill_is_bit_identical(config, base["data"], tmp_path)
    assert yaml.safe_load((killed / "run.yaml").read_text())["init"]["step"] == 30


@pytest.mark.slow
def test_freeze_keeps_the_frozen_weights(base, tmp_path):
    config = write_config(tmp_path / "c.yaml", [*base["sets"], f"init.from=run:{base['run']}", "train.steps=10",
                                                "train.checkpoint_every=10", "freeze.train_last_blocks=1",
                                                "freeze.params=[network.patch.*]"])
    result = run(vgen_train_cmd(config, base["data"], tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frozen" in result.stderr
    start, end = final_weights(base["run"], "ema"), final_weights(tmp_path / "run", "model")
    frozen = [k for k in start if k.startswith(("network.blocks.0.", "network.patch."))]
    trained = [k for k in start if k.startswith("network.blocks.1.") and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(start[k], end[k]) for k in frozen)
    assert any(not torch.equal(start[k], end[k]) for k in trained)
    bad = run(vgen_train_cmd(config, base["data"], tmp_path / "bad", "freeze.params=[nothing.*]"))
    assert bad.returncode == 2 and "matches no parameter" in bad.stderr


@pytest.mark.slow
def test_early_stopping_stops_within_patience_and_generates_from_the_best(base, tmp_path, vgen_cli):
    patience, every = 2, 5
    config = write_config(tmp_path / "c.yaml", [*base["sets"], "train.steps=5000", f"train.val_every={every}",
                                                "train.checkpoint_every=5000", "train.keep_checkpoints=1",
                                                "train.early_stopping.metric=val_loss_ema",
                                                f"train.early_stopping.patience={patience}",
                                                "train.early_stopping.min_delta=0.01"])
    out = tmp_path / "run"
    result = run(vgen_train_cmd(config, base["data"], out))
    assert result.returncode == 0 and "early stopping at step" in result.stderr, result.stderr[-3000:]
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    best, stopped = manifest["best"], manifest["early_stopped"]
    assert manifest["status"] == "done" and stopped["step"] < 5000
    assert stopped["step"] - best["step"] == patience * every  # stopped `patience` validations after the best
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = {r["step"]: r["val_loss_ema"] for r in rows if "val_loss_ema" in r}
    assert best["value"] == values[best["step"]]
    # no later validation improved on it by more than min_delta
    assert all(v > best["value"] - 0.01 for step, v in values.items() if step > best["step"])
    assert len([s for s in values if s > best["step"]]) == patience
    steps = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(out)]
    assert best["step"] in steps and steps[-1] == stopped["step"]  # kept although keep_checkpoints=1
    generated = vgen_cli("generate", "red", "--run", out, "--checkpoint", "best", "-o", tmp_path / "g")
    assert generated.exit_code == 0, generated.stderr
    assert yaml.safe_load((tmp_path / "g" / "generation.yaml").read_text())["model"]["step"] == best["step"]
    from vgen.evaluate.runner import _select_checkpoints

    assert _select_checkpoints(out, "best") == [best["step"]]
    # run again: it stopped, so nothing more is trained
    again = run(vgen_train_cmd(config, base["data"], out))
    assert again.returncode == 0 and steps == [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(out)]
    no_best = vgen_cli("generate", "red", "--run", base["run"], "--checkpoint", "best", "-o", tmp_path / "h")
    assert no_best.exit_code == 2 and "marks no best checkpoint" in no_best.stderr


@pytest.mark.slow
def test_a_gan_adapter_adapts_the_generator_and_trains_the_whole_discriminator(base, tmp_path, vgen_cli):
    from tests.test_families import TINY_GAN

    text = next(s for s in base["sets"] if s.startswith("text_encoder.source="))
    sets = [*TINY_GAN, text, "train.steps=4", "train.checkpoint_every=4", "train.val_every=1000",
            "train.sample_every=1000"]
    gan_base = tmp_path / "gan"
    assert run(vgen_train_cmd(write_config(tmp_path / "g.yaml", sets), base["data"], gan_base)).returncode == 0
    config = write_config(tmp_path / "a.yaml", [*sets, f"init.from=run:{gan_base}", "adapter.rank=2"])
    result = run(vgen_train_cmd(config, base["data"], tmp_path / "adapted"))
    assert result.returncode == 0, result.stderr[-3000:]
    last = ckpt.list_checkpoints(tmp_path / "adapted")[-1]
    model, ema = load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))
    full = load_file(str(ckpt.list_checkpoints(gan_base)[-1] / "model.safetensors"))
    d_keys = {k for k in full if k.startswith("d.")}
    assert d_keys and d_keys <= set(model)  # D trains in full
    assert {k for k in model if not k.startswith("d.")} == {f"g.{k}" for k in ema}
    assert ema and all(k.endswith(("lora_A", "lora_B")) for k in ema)  # G: the factors alone
    assert vgen_cli("generate", "red", "--run", tmp_path / "adapted", "-o", tmp_path / "g").exit_code == 0
