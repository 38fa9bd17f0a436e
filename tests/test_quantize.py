"""Finite scalar quantization: the grid it rounds to, token ids that invert, the straight-through
gradient, codebook statistics, and a vae run with `autoencoder.quantizer: fsq` that tokenizes."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from tests.test_train import run, vgen_train_cmd, write_config
from tests.test_vae import assets, vae_sets  # noqa: F401  (the module's fixture)
from vgen.errors import ConfigError
from vgen.families.config import train_config_from_dict
from vgen.models.quantize import FSQ, codebook_statistics


def test_fsq_rounds_each_channel_to_its_own_levels():
    fsq = FSQ([8, 5, 3])
    assert fsq.codebook_size == 120
    z = torch.linspace(-20, 20, 4001).view(1, 1, -1, 1).expand(1, 3, -1, 1)
    codes = fsq(z)
    # even L: -L/2 .. L/2 - 1 over L/2; odd L: -(L-1)/2 .. (L-1)/2 over (L-1)/2
    assert sorted(codes[0, 0].unique().tolist()) == [n / 4 for n in range(-4, 4)]
    assert sorted(codes[0, 1].unique().tolist()) == [n / 2 for n in range(-2, 3)]
    assert sorted(codes[0, 2].unique().tolist()) == [-1.0, 0.0, 1.0]
    assert torch.equal(fsq(torch.zeros(1, 3, 1, 1)).flatten(), torch.tensor([0.0, 0.0, 0.0]))  # 0 is on every grid


def test_fsq_token_ids_are_mixed_radix_and_invert():
    fsq = FSQ([8, 5, 5, 5])
    ids = torch.arange(1000).view(10, 10, 10)
    codes = fsq.codes(ids)
    assert codes.shape == (10, 4, 10, 10) and codes.min() == -1 and codes.max() <= 1
    assert torch.equal(fsq.indices(codes), ids)
    # id = d0 + 8 d1 + 40 d2 + 200 d3, digit d = code * half width + half width
    digits = torch.tensor([3, 1, 4, 2])
    code = ((digits - torch.tensor([4, 2, 2, 2])) / torch.tensor([4.0, 2, 2, 2])).view(1, 4, 1, 1)
    assert fsq.indices(code).item() == 3 + 8 * 1 + 40 * 4 + 200 * 2


def test_fsq_gradient_is_straight_through_the_rounding():
    fsq = FSQ([5])
    z = torch.tensor([[[[0.3]]]], requires_grad=True)
    fsq(z).sum().backward()
    # d/dz of tanh(z) * half_l / half_width: the bound's slope, the rounding ignored
    half_l = 4 * 1.001 / 2
    torch.testing.assert_close(z.grad.flatten(), torch.tensor([(1 - math.tanh(0.3) ** 2) * half_l / 2]))


def test_codebook_statistics_known_answers():
    uniform = codebook_statistics(torch.arange(8).repeat(3), 8)
    assert uniform == {"codebook_usage": 1.0, "codebook_perplexity": pytest.approx(8.0)}
    half = codebook_statistics(torch.tensor([0, 1, 0, 1]), 4)
    assert half == {"codebook_usage": 0.5, "codebook_perplexity": pytest.approx(2.0)}


def test_fsq_config_errors():
    with pytest.raises(ConfigError, match="z_channels is 4 but levels .* set z_channels to 3"):
        train_config_from_dict({"kind": "vae", "vae": {"autoencoder": {"quantizer": "fsq", "levels": [8, 5, 5]}}})
    with pytest.raises(ConfigError, match="integers >= 3"):
        train_config_from_dict({"kind": "vae", "vae": {"autoencoder": {"quantizer": "fsq", "levels": [8, 5, 2, 5]}}})
    with pytest.raises(ConfigError, match="codebook of 1,048,576 codes"):
        train_config_from_dict({"kind": "vae", "vae": {"autoencoder": {"quantizer": "fsq", "levels": [32] * 4}}})
    with pytest.raises(ConfigError, match=r"vae.autoencoder.quantizer: expected one of .none., .fsq."):
        train_config_from_dict({"kind": "vae", "vae": {"autoencoder": {"quantizer": "vq"}}})
    with pytest.raises(ConfigError, match="Gaussian prior"):
        train_config_from_dict({"kind": "vae", "vae": {"text_conditioned": True,
                                                       "autoencoder": {"quantizer": "fsq"}}})


def test_fsq_autoencoder_tokenizes_and_decodes_its_tokens():
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "vae", "vae": {"image_size": 16, "autoencoder": {
        "width": 8, "groups": 4, "quantizer": "fsq", "levels": [4, 3, 3], "z_channels": 3}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    ae, x = family.model.ae, torch.rand(2, 3, 16, 16) * 2 - 1
    codes, logvar = ae.encode(x)
    tokens = ae.encoder.tokens(x)
    assert logvar is None and tokens.shape == (2, 4, 4) and 0 <= tokens.min() and tokens.max() < 36
    with torch.no_grad():
        torch.testing.assert_close(ae.detokenize(tokens), ae.decode(codes))
    loss, logs = family.ae_loss(ae, {"x": x, "captions": ["a", "b"], "eps": torch.randn(2, 3, 4, 4)}, 0)
    assert "kl" not in logs and torch.isfinite(loss)


@pytest.mark.slow
def test_fsq_tokenizer_learns_and_reports_its_codebook(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    sets = [*vae_sets(200, every=100), "optim.lr=3e-3", "vae.autoencoder.quantizer=fsq",
            "vae.autoencoder.levels=[5, 5, 5]", "vae.autoencoder.z_channels=3"]
    result = run(vgen_train_cmd(write_config(tmp_path / "c.yaml", sets), assets["data"], out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_psnr" in r]
    assert val[-1]["val_psnr"] > val[0]["val_psnr"] + 3, val
    assert 0 < val[-1]["val_codebook_usage"] <= 1 and 1 <= val[-1]["val_codebook_perplexity"] <= 125
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    assert manifest["export"]["quantizer"] == {"kind": "fsq", "levels": [5, 5, 5], "codebook_size": 125}
