"""The vae family: a KL autoencoder that learns to reconstruct, resumes bit for bit with its GAN
phase on, and, text-conditioned, draws images from prompts through `vgen generate`."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.test_train import (assert_resume_after_sigkill_is_bit_identical, final_weights, run, vgen_train_cmd,
                              write_config)
from tests.train_fixtures import colour_dataset, tiny_text_encoder
from vgen.errors import ConfigError
from vgen.families.config import train_config_from_dict

TINY_VAE = [
    "kind=vae", "vae.image_size=16", "vae.autoencoder.width=8", "vae.autoencoder.multipliers=[1, 2, 2]",
    "vae.autoencoder.groups=4", "vae.sample_prompts=[red, blue]", "vae.sample_seeds=2", "train.batch_size=16",
    "train.log_every=5", "train.val_images=32", "train.precision=fp32", "optim.warmup_steps=10", "ema.decay=0.9",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-assets")
    return {"data": colour_dataset(root), "text": tiny_text_encoder(root)}


def vae_sets(steps: int, checkpoint_every: int | None = None, every: int = 100000) -> list[str]:
    return [*TINY_VAE, f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every or steps}",
            f"train.val_every={every}", f"train.sample_every={every}"]


def test_kl_divergence_known_answers():
    from vgen.families.vae import kl_divergence

    zero = torch.zeros(2, 4, 3, 3)
    assert torch.equal(kl_divergence(zero, zero), torch.zeros(2))
    # KL(N(1, 1) || N(0, 1)) = 1/2 per element; KL(N(0, e^2) || N(0, 1)) = (e^2 - 1 - 2) / 2
    torch.testing.assert_close(kl_divergence(torch.ones(1, 4, 3, 3), zero[:1]), torch.tensor([18.0]))
    torch.testing.assert_close(kl_divergence(zero[:1], torch.full((1, 4, 3, 3), 2.0)),
                               torch.tensor([36 * (torch.e ** 2 - 3) / 2]))


def test_autoencoder_shapes_and_text_conditioning(tmp_path):
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "vae", "vae": {"image_size": 16, "autoencoder": {"width": 8, "groups": 4,
                                                                                            "multipliers": [1, 2, 2, 2]}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    ae = family.model.ae
    mean, logvar = ae.encode(torch.zeros(3, 3, 16, 16))
    assert mean.shape == logvar.shape == (3, 4, 2, 2) == (3, *family.latent_shape)  # factor 8
    assert ae.decode(mean).shape == (3, 3, 16, 16)
    assert not hasattr(family.model, "d") and [p.name for p in family.phases()] == ["autoencoder"]

    text = tiny_text_encoder(tmp_path)
    cfg = train_config_from_dict({"kind": "vae", "text_encoder": {"source": f"local-dir:{text}"},
                                  "vae": {"image_size": 16, "text_conditioned": True, "gan_weight": 0.5,
                                          "autoencoder": {"width": 8, "groups": 4}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    z = torch.randn(1, *family.latent_shape).expand(2, -1, -1, -1)
    with torch.no_grad():
        red, blue = family.model.ae.decode(z, ["red", "blue"])
    assert not torch.allclose(red, blue)  # the caption reaches the decoder
    assert [p.name for p in family.phases()] == ["autoencoder", "discriminator"]


def test_vae_config_errors():
    with pytest.raises(ConfigError, match="image_size 18 is not a multiple of the downsampling factor 4"):
        train_config_from_dict({"kind": "vae", "vae": {"image_size": 18}})
    with pytest.raises(ConfigError, match="both 0"):
        train_config_from_dict({"kind": "vae", "vae": {"l1_weight": 0, "l2_weight": 0}})


def test_adversarial_term_is_weighted_by_the_gradient_ratio(tmp_path):
    """From gan_start on, the decoder's loss gains gan_weight * w * adversarial with w = |grad rec| /
    |grad adv| at its last layer; before it, the discriminator phase gives no gradient."""
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "vae", "vae": {"image_size": 16, "gan_weight": 0.5, "gan_start": 3,
                                                         "autoencoder": {"width": 8, "groups": 4}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    torch.manual_seed(0)
    batch = {"x": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a", "b"], "eps": torch.randn(2, *family.latent_shape)}
    before, logs = family.ae_loss(family.model.ae, batch, 2)
    assert "adversarial" not in logs
    d_before, _ = family.d_loss(family.model.d, batch, 2)
    d_before.backward()
    assert all(p.grad is None for p in family.model.d.parameters())
    after, logs = family.ae_loss(family.model.ae, batch, 3)
    y = batch["reconstruction"]
    last = family.model.ae.decoder.out.weight
    torch.testing.assert_close(after, before + 0.5 * logs["gan_weight"] * logs["adversarial"])
    torch.testing.assert_close(logs["adversarial"], -family.model.d(y).mean())
    d_loss, d_logs = family.d_loss(family.model.d, batch, 3)
    d_loss.backward()
    assert all(p.grad is not None for p in family.model.d.parameters()) and last.grad is None


@pytest.mark.slow
def test_vae_learns_to_reconstruct(assets, tmp_path):
    out = tmp_path / "run"
    result = run(vgen_train_cmd(write_config(tmp_path / "c.yaml", [*vae_sets(300, every=150), "optim.lr=3e-3"]),
                                assets["data"], out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_psnr" in r]
    assert val[-1]["val_psnr"] > 18 and val[-1]["val_psnr"] > val[0]["val_psnr"] + 3, val  # 7 dB at step 0
    assert 0 < val[-1]["val_ssim"] <= 1
    assert (out / "samples" / "step-00000300.png").is_file()
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    assert manifest["export"]["latent_shape"] == [4, 4, 4]


@pytest.mark.slow
def test_vae_resume_after_sigkill_is_bit_identical(assets, tmp_path):
    config = write_config(tmp_path / "c.yaml", [*vae_sets(16, checkpoint_every=4), "vae.gan_weight=0.5",
                                                "vae.gan_start=6"])
    killed = assert_resume_after_sigkill_is_bit_identical(config, assets["data"], tmp_path)
    assert any(k.startswith("d.") for k in final_weights(killed, "model"))  # the GAN phase ran


@pytest.mark.slow
def test_text_conditioned_vae_generates_and_an_autoencoder_refuses(assets, tmp_path, vgen_cli):
    conditioned = tmp_path / "cvae"
    sets = [*vae_sets(2), "vae.text_conditioned=true", "vae.kl_weight=1.0",
            f"text_encoder.source=local-dir:{assets['text']}"]
    assert run(vgen_train_cmd(write_config(tmp_path / "c.yaml", sets), assets["data"], conditioned)).returncode == 0
    made = vgen_cli("generate", "red", "blue", "--run", conditioned, "-o", tmp_path / "g", "--batch-size", "1")
    assert made.exit_code == 0, made.stderr
    again = vgen_cli("generate", "red", "blue", "--run", conditioned, "-o", tmp_path / "g2", "--batch-size", "2")
    from PIL import Image

    a, b = sorted((tmp_path / "g").glob("*.png")), sorted((tmp_path / "g2").glob("*.png"))
    assert again.exit_code == 0 and len(a) == 2 and [Image.open(p).tobytes() for p in a] == \
        [Image.open(p).tobytes() for p in b]
    refused = vgen_cli("generate", "red", "--run", conditioned, "-o", tmp_path / "g3", "--steps", "4")
    assert refused.exit_code == 2 and "--steps" in refused.stderr and "vae" in refused.stderr

    plain = tmp_path / "ae"
    assert run(vgen_train_cmd(write_config(tmp_path / "p.yaml", vae_sets(2)), assets["data"], plain)).returncode == 0
    result = vgen_cli("generate", "red", "--run", plain, "-o", tmp_path / "g4")
    assert result.exit_code == 2 and "text_conditioned" in result.stderr, result.stderr


def test_vae_trains_on_crops_of_the_latent_grid(assets):
    """vae.crop_size: each sample is a crop of its image at a corner on the latent grid (factor 4),
    drawn from (seed, sample index); eps has the crop's latent shape; bad sizes are refused."""
    from vgen.data.dataset import ImageCaptionDataset
    from vgen.families import build_family
    from vgen.randomness import SampleOrder

    cfg = train_config_from_dict({"kind": "vae", "vae": {"image_size": 16, "crop_size": 8,
                                                         "autoencoder": {"width": 8, "groups": 4}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    dataset = ImageCaptionDataset(assets["data"], "train")
    order = SampleOrder(0, len(dataset))
    batch = family.make_batch(dataset, order, 0, list(range(12)))
    assert batch["x"].shape == (12, 3, 8, 8) and batch["eps"].shape == (12, 4, 2, 2)
    corners = []
    for g, crop in enumerate(batch["x"]):
        whole = (dataset.image(order(g)).float() / 127.5 - 1)
        found = {(y, x) for y in range(0, 9, 4) for x in range(0, 9, 4) if torch.equal(whole[:, y:y + 8, x:x + 8], crop)}
        assert found, g  # a crop at a corner on the latent grid
        corners.append(found)
    assert not set.intersection(*corners)  # not one corner that every crop could have come from
    again = family.make_batch(dataset, order, 0, list(range(12)))
    assert torch.equal(again["x"], batch["x"]) and torch.equal(again["eps"], batch["eps"])
    for bad, message in (({"crop_size": 6}, "multiple of the downsampling factor 4"),
                         ({"crop_size": 32}, "at most image_size 16"),
                         ({"crop_size": 8, "text_conditioned": True}, "whole image")):
        with pytest.raises(ConfigError, match=message):
            train_config_from_dict({"kind": "vae", "vae": {"image_size": 16, **bad}})
