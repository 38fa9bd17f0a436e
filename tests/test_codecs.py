"""The codec seam (vgen.codecs): pixels, a vgen vae run and a diffusers AutoencoderKL (a tiny one
the tests save themselves), the latent cache, and flow trained, sampled, SDEdited and inpainted
through a latent codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.test_train import (TINY_FLOW, assert_resume_after_sigkill_is_bit_identical, run, vgen_train_cmd,
                              write_config)
from tests.train_fixtures import colour_dataset, tiny_text_encoder
from vgen.codecs import ModelSpace, PixelCodec, load_codec
from vgen.errors import ConfigError, IntegrityError, ManifestError, MissingDependencyError, UsageError
from vgen.manifest import write_manifest

TINY_VAE = ["kind=vae", "vae.image_size=16", "vae.autoencoder.width=8", "vae.autoencoder.multipliers=[1, 2, 2]",
            "vae.autoencoder.groups=4", "train.batch_size=8", "train.precision=fp32", "train.steps=2",
            "train.val_every=1000", "train.sample_every=1000", "train.checkpoint_every=2", "train.val_images=8"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec-assets")
    data = colour_dataset(root)
    vae_run = root / "vae"
    result = run(vgen_train_cmd(write_config(root / "vae.yaml", TINY_VAE), data, vae_run))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "text": tiny_text_encoder(root), "vae": vae_run, "diffusers": tiny_autoencoder_kl(root)}


def tiny_autoencoder_kl(root):
    """A randomly initialised diffusers AutoencoderKL (factor 2, 4 latent channels), saved as a
    user would save SD's VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "tiny-sd-vae")
    return root / "tiny-sd-vae"


# --- the pieces -----------------------------------------------------------------------------------


def test_model_space_standardizes_with_measured_mean_and_std():
    latents = torch.tensor([1.0, 3.0, 5.0, 7.0]).reshape(1, 1, 2, 2)
    shift, scale = ModelSpace.measure(latents)
    assert shift == 4.0 and scale == pytest.approx(1 / np.std([1, 3, 5, 7], ddof=1))
    space = ModelSpace(PixelCodec(), 0.0, 1.0)
    x = torch.randn(2, 3, 4, 4)
    assert space.encode(x) is x and space.decode(x) is x  # pixels: no arithmetic at all


def test_mask_goes_to_the_latent_grid_by_max_pooling():
    codec = PixelCodec()
    codec.factor = 4  # a latent grid 4x coarser than the image
    mask = torch.zeros(1, 8, 8)
    mask[0, 5, 2] = 1  # one pixel to regenerate: its whole 4x4 cell is regenerated
    expected = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    assert torch.equal(codec.mask_to_latent(mask), expected)


def test_unknown_codec_is_refused():
    with pytest.raises(ConfigError, match="expected 'pixels'.*got 'vqgan:x'"):
        load_codec("vqgan:x", 3)


def test_vae_run_codec_encodes_and_decodes(assets):
    codec = load_codec(f"run:{assets['vae']}", 3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 4, 4) == (2, *codec.latent_shape(16))
    assert codec.decode(z).shape == x.shape
    assert codec.source == f"run:{assets['vae']}@2" and len(codec.sha256) == 64


def test_missing_or_corrupt_codec_run_is_refused(assets, tmp_path, vgen_cli):
    with pytest.raises(UsageError, match="no such directory; expected .*vae run"):
        load_codec(f"run:{tmp_path / 'nope'}", 3)
    with pytest.raises(ManifestError, match="is a flow run; expected"):
        flow_dir = tmp_path / "flow"
        flow_dir.mkdir()
        write_manifest(flow_dir / "run.yaml", "run", {"train_kind": "flow", "config": {}})
        load_codec(f"run:{flow_dir}", 3)
    import shutil

    broken = tmp_path / "broken-vae"
    shutil.copytree(assets["vae"], broken)
    ema = next(broken.glob("checkpoints/*/ema.safetensors"))
    ema.write_bytes(ema.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match="ema.safetensors \\(sha256 differs\\)"):
        load_codec(f"run:{broken}", 3)


def test_diffusers_codec_loads_a_saved_autoencoder_kl(assets, tmp_path):
    codec = load_codec(f"diffusers:{assets['diffusers']}", 3)
    assert (codec.channels, codec.factor) == (4, 2)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert codec.encode(x).shape == (1, 4, 8, 8) and codec.decode(codec.encode(x)).shape == x.shape
    # a pipeline folder (its VAE under vae/) loads the same weights
    import shutil

    shutil.copytree(assets["diffusers"], tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert load_codec(f"diffusers:{tmp_path / 'pipeline'}", 3).sha256 == codec.sha256


def test_a_recorded_codec_name_is_a_repo_id_only_where_the_prefix_allows_one(tmp_path):
    from vgen.codecs import REPO_ID_PREFIXES, SOURCE_PREFIXES
    from vgen.runs import resolve_recorded_source

    run_dir, manifest = tmp_path / "runs" / "latent", {}
    run_dir.mkdir(parents=True)
    (tmp_path / "runs" / "sd-vae").mkdir()  # a folder under a parent of the run dir wins over a repo id
    found = resolve_recorded_source("diffusers:sd-vae", "codec", SOURCE_PREFIXES, run_dir, manifest,
                                    run_dir / "run.yaml", repo_id_prefixes=REPO_ID_PREFIXES)
    assert found == "diffusers:" + str((tmp_path / "runs" / "sd-vae").resolve())
    repo = resolve_recorded_source("diffusers:stabilityai/sd-vae-ft-mse", "codec", SOURCE_PREFIXES, run_dir,
                                   manifest, run_dir / "run.yaml", repo_id_prefixes=REPO_ID_PREFIXES)
    assert repo == "diffusers:stabilityai/sd-vae-ft-mse"
    (tmp_path / "runs" / "vae").mkdir()  # a codec records the checkpoint it measured: run:DIR@STEP
    step = resolve_recorded_source("run:vae@2000", "codec", SOURCE_PREFIXES, run_dir, manifest, run_dir / "run.yaml")
    assert step == "run:" + str((tmp_path / "runs" / "vae").resolve()) + "@2000"
    with pytest.raises(UsageError, match="run:no-such/vae"):  # a run: source is always a path
        resolve_recorded_source("run:no-such/vae", "codec", SOURCE_PREFIXES, run_dir, manifest,
                                run_dir / "run.yaml", repo_id_prefixes=REPO_ID_PREFIXES)


def test_diffusers_codec_never_downloads_and_says_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingDependencyError, match="neither a local directory nor in the Hugging Face cache.*"
                                                     "codec: diffusers:/path"):
        load_codec("diffusers:stabilityai/sd-vae-ft-mse", 3)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="only safetensors are read"):
        load_codec(f"diffusers:{pickled}", 3)


def test_latent_cache_is_written_once_and_keyed_by_the_codec(assets, tmp_path):
    from vgen.codecs.cache import cache_file, encode_split
    from vgen.data.dataset import ImageCaptionDataset, dataset_content_sha256

    dataset = ImageCaptionDataset(assets["data"], "train")
    sha = dataset_content_sha256(assets["data"])
    codec = load_codec(f"run:{assets['vae']}", 3)
    first = encode_split(codec, dataset, sha, "cpu", cache_dir=tmp_path)
    path = cache_file(codec, sha, "train", tmp_path)
    assert path.is_file() and first.shape == (len(dataset), 4, 4, 4)
    images = torch.stack([dataset.image(i) for i in range(3)]).float() / 127.5 - 1
    torch.testing.assert_close(first[:3], codec.encode(images), rtol=1e-5, atol=1e-5)  # what the encoder gives
    stamp = path.stat().st_mtime_ns
    assert torch.equal(encode_split(codec, dataset, sha, "cpu", cache_dir=tmp_path), first)
    assert path.stat().st_mtime_ns == stamp  # read, not written again
    other = load_codec(f"diffusers:{assets['diffusers']}", 3)
    assert cache_file(other, sha, "train", tmp_path) != path
    path.write_bytes(b"not safetensors")  # damaged: encoded again
    assert torch.equal(encode_split(codec, dataset, sha, "cpu", cache_dir=tmp_path), first)


def test_flow_network_must_match_the_codec_latents(assets):
    from vgen.families import build_family
    from vgen.families.config import train_config_from_dict

    cfg = train_config_from_dict({"kind": "flow", "codec": f"run:{assets['vae']}",
                                  "text_encoder": {"source": f"local-dir:{assets['text']}"},
                                  "flow": {"network": {"image_size": 16, "patch_size": 4}}})
    with pytest.raises(ConfigError, match="images are 4 x 4 px through codec run:.*set --set "
                                          "flow.network.image_size=4 --set flow.network.channels=4"):
        build_family(cfg, 16, torch.device("cpu"))


# --- latent flow, end to end ----------------------------------------------------------------------


def latent_flow_sets(assets, codec: str, steps: int, checkpoint_every: int | None = None) -> list[str]:
    size = 4 if codec.startswith("run:") else 8
    return [*TINY_FLOW, f"codec={codec}", f"text_encoder.source=local-dir:{assets['text']}",
            f"flow.network.image_size={size}", "flow.network.channels=4", "flow.network.patch_size=2",
            f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every or steps}",
            "train.val_every=100000", "train.sample_every=100000"]


@pytest.mark.slow
def test_latent_flow_through_diffusers_generates_sdedits_and_inpaints(assets, tmp_path, monkeypatch, vgen_cli):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = write_config(tmp_path / "c.yaml", latent_flow_sets(assets, f"diffusers:{assets['diffusers']}", 3))
    out = tmp_path / "run"
    result = run(vgen_train_cmd(config, assets["data"], out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoding the train images" in result.stderr
    recorded = yaml.safe_load((out / "run.yaml").read_text())["codec"]
    assert recorded["source"] == f"diffusers:{assets['diffusers']}" and len(recorded["sha256"]) == 64
    assert recorded["scale"] > 0 and (recorded["channels"], recorded["factor"]) == (4, 2)
    assert len(list((tmp_path / "cache" / "vgen" / "latents").glob("*.safetensors"))) == 2  # train and val
    again = run(vgen_train_cmd(config, assets["data"], tmp_path / "run2"))
    assert again.returncode == 0 and "encoding" not in again.stderr  # the cache is read

    gen = vgen_cli("generate", "red", "--run", out, "-n", "2", "--out", tmp_path / "gen")
    assert gen.exit_code == 0, gen.stderr
    assert Image.open(tmp_path / "gen" / "00000-red.png").size == (16, 16)

    init = np.full((16, 16, 3), 255, np.uint8)
    init[4:12, 4:12] = (0, 0, 255)
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :5] = 255  # regenerate the left 5 columns: 3 latent columns of the factor-2 grid
    Image.fromarray(mask).save(tmp_path / "mask.png")
    edit = vgen_cli("generate", "red", "--run", out, "--init-image", tmp_path / "init.png", "--strength", "0.5",
                    "--out", tmp_path / "sdedit")
    assert edit.exit_code == 0, edit.stderr
    inpaint = vgen_cli("generate", "red", "--run", out, "--init-image", tmp_path / "init.png", "--mask",
                       tmp_path / "mask.png", "-n", "2", "--out", tmp_path / "inpaint")
    assert inpaint.exit_code == 0, inpaint.stderr
    for name in ("00000-red.png", "00001-red.png"):
        pixels = np.asarray(Image.open(tmp_path / "inpaint" / name).convert("RGB"))
        assert np.array_equal(pixels[:, 5:], init[:, 5:])  # the known pixels are the input's, exactly
        assert not np.array_equal(pixels[:, :5], init[:, :5])  # and the masked ones were drawn anew


@pytest.mark.slow
def test_latent_flow_refuses_a_codec_that_changed(assets, tmp_path, monkeypatch, vgen_cli):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    vae = tmp_path / "vae"
    shutil.copytree(assets["vae"], vae)
    config = write_config(tmp_path / "c.yaml", latent_flow_sets(assets, f"run:{vae}", 2))
    out = tmp_path / "run"
    assert run(vgen_train_cmd(config, assets["data"], out)).returncode == 0
    assert yaml.safe_load((out / "run.yaml").read_text())["codec"]["source"] == f"run:{vae}@2"
    assert vgen_cli("generate", "red", "--run", out, "--out", tmp_path / "a").exit_code == 0
    shutil.rmtree(vae)
    missing = vgen_cli("generate", "red", "--run", out, "--out", tmp_path / "b")
    assert missing.exit_code == 2 and "no such directory" in missing.stderr and "vae run" in missing.stderr


@pytest.mark.slow
def test_latent_flow_resume_after_sigkill_is_bit_identical(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = write_config(tmp_path / "c.yaml", latent_flow_sets(assets, f"run:{assets['vae']}", 12, 4))
    assert_resume_after_sigkill_is_bit_identical(config, assets["data"], tmp_path)


@pytest.mark.slow
def test_latent_gpu_config_builds_and_steps_at_tiny_size(assets, tmp_path, monkeypatch):
    """configs/latent-256-gpu.yaml, shrunk (the tests' tiny AutoencoderKL in place of SD's VAE):
    the file parses, builds, caches latents and takes one step on CPU."""
    from tests.test_train import REPO

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "gpu"
    cmd = vgen_train_cmd(REPO / "configs" / "latent-256-gpu.yaml", assets["data"], out,
                         f"codec=diffusers:{assets['diffusers']}", f"text_encoder.source=local-dir:{assets['text']}",
                         "train.device=cpu", "train.compile=false", "flow.network.image_size=8",
                         "flow.network.width=48", "flow.network.depth=1", "flow.network.heads=2", "train.batch_size=4",
                         "train.steps=1", "flow.sample_steps=2")
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    assert manifest["config"]["train"]["precision"] == "bf16" and manifest["codec"]["factor"] == 2
    assert manifest["config"]["flow"]["network"]["channels"] == 4


def test_fidelity_known_answers():
    from vgen.evaluate.reconstruction import fidelity

    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    same = fidelity(x, x)
    assert same["psnr"]["value"] == float("inf") and same["ssim"]["value"] == pytest.approx(1.0)
    off = x.clone()
    off[0, 0, 0, 0] = (int(x[0, 0, 0, 0]) + 128) % 256  # one value off by 128 levels in image 0 only
    expected = 10 * np.log10(1 / ((128 / 255) ** 2 / (3 * 16 * 16)))
    assert fidelity(x[:1], off[:1])["psnr"]["value"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_evaluate_a_codec_reports_psnr_ssim_and_rfid(assets, tmp_path, vgen_cli):
    out = tmp_path / "eval"
    # the tests' val split has 3 images: enough for FID, not for KID and precision/recall (4)
    result = vgen_cli("evaluate", "--codec", f"run:{assets['vae']}", "--data", assets["data"], "--out", out,
                      "--metrics", "fid")
    assert result.exit_code == 0, result.stderr
    manifest = yaml.safe_load((out / "evaluation.yaml").read_text())
    metrics = manifest["metrics"]
    assert manifest["mode"] == "reconstruction" and manifest["codec"]["sha256"]
    assert 0 < metrics["psnr"]["value"] < 60 and -1 <= metrics["ssim"]["value"] <= 1
    assert metrics["fid"]["value"] > 0 or "unavailable" in metrics["fid"]
    assert (out / "reconstruction-grid.png").is_file() and (out / "report.html").is_file()
    # the identity codec reconstructs perfectly: infinite PSNR, SSIM 1, FID 0 (to rounding)
    perfect = vgen_cli("evaluate", "--codec", "pixels", "--data", assets["data"], "--out", tmp_path / "p",
                       "--metrics", "fid")
    assert perfect.exit_code == 0, perfect.stderr
    metrics = yaml.safe_load((tmp_path / "p" / "evaluation.yaml").read_text())["metrics"]
    assert metrics["psnr"]["value"] == float("inf") and metrics["ssim"]["value"] == pytest.approx(1.0)
    if "unavailable" not in metrics["fid"]:
        assert abs(metrics["fid"]["value"]) < 1e-3
