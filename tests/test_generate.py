"""`vgen generate`: pixels that depend only on (prompt, seed, settings), metadata that round-trips,
prompts from stdin, image editing, and clear errors. One tiny flow run is trained per module."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.test_train import TINY_FLOW
from tests.train_fixtures import colour_dataset, tiny_text_encoder
from vgen.config import apply_overrides
from vgen.diffusion.samplers import time_grid, truncate_grid
from vgen.errors import UsageError
from vgen.generate import GenerationRequest, generate, load_edit_inputs, read_png_metadata, sample_images
from vgen.runs import load_run
from vgen.manifest import read_manifest, sha256_file, write_manifest
from vgen.families.config import train_config_from_dict

STEPS = 6  # sampler steps in these tests: enough to exercise the loop, cheap on 2 cores


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A colour-squares dataset and a flow run trained on it for 40 steps (a few seconds).

    Training runs with the text encoder given as a path relative to its working directory, as
    `make demo` does (`run:demo/text-encoder`), so generating from elsewhere must resolve it."""
    from vgen.train.loop import train

    root = tmp_path_factory.mktemp("generate-assets")
    data = colour_dataset(root)
    tiny_text_encoder(root)
    sets = [*TINY_FLOW, "text_encoder.source=local-dir:tiny-clip", "train.steps=40", "train.batch_size=32",
            "optim.lr=2e-3", "ema.decay=0.9", "train.checkpoint_every=20", "train.val_every=1000",
            "train.sample_every=1000"]
    cfg = train_config_from_dict(apply_overrides({}, sets))
    previous = os.getcwd()
    os.chdir(root)
    try:
        train(cfg, data, Path("run"))
    finally:
        os.chdir(previous)
    return {"root": root, "data": data, "run": root / "run"}


@pytest.fixture(scope="module")
def gen(assets):
    return load_run(assets["run"], device="cpu")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_request(gen, out: Path, **kwargs) -> dict:
    request = GenerationRequest(**{"prompts": ["red", "blue"], "n": 3, "seed": 5, "steps": STEPS, **kwargs})
    return generate(gen, request, out)


def test_same_pixels_twice_and_for_any_batch_size(gen, tmp_path):
    first = run_request(gen, tmp_path / "a", batch_size=6)
    again = run_request(gen, tmp_path / "b", batch_size=6)
    single = run_request(gen, tmp_path / "c", batch_size=1)
    assert [Path(i["file"]).name for i in first["images"]] == [Path(i["file"]).name for i in single["images"]]
    for a, b, c in zip(first["images"], again["images"], single["images"]):
        assert sha256_file(a["file"]) == sha256_file(b["file"])  # bit for bit, metadata included
        diff = np.abs(pixels(Path(a["file"])) - pixels(Path(c["file"]))).max()
        assert diff == 0, (a["file"], diff)
    # different seeds give different images
    assert not np.array_equal(pixels(Path(first["images"][0]["file"])), pixels(Path(first["images"][1]["file"])))


def test_the_network_sees_one_batch_shape_whatever_the_request(gen, monkeypatch):
    """What makes the pixels independent of --batch-size: every network call gets FIXED_BATCH images
    (twice that with guidance), padded when fewer are asked for."""
    from vgen.families.base import FIXED_BATCH

    shapes = []
    velocity = gen.model.velocity
    monkeypatch.setattr(gen.model, "velocity", lambda x, *a, **k: shapes.append(x.shape[0]) or velocity(x, *a, **k))
    for n in (1, 3, FIXED_BATCH + 1):
        request = GenerationRequest(prompts=["red"], n=n, steps=2, guidance=3.0).resolved(gen)
        sample_images(gen, ["red"] * n, list(range(n)), request)
    assert set(shapes) == {2 * FIXED_BATCH}, shapes


def test_image_i_has_seed_s_plus_i(gen, tmp_path):
    whole = run_request(gen, tmp_path / "whole", prompts=["green"], n=4, seed=10, batch_size=1)
    assert [i["seed"] for i in whole["images"]] == [10, 11, 12, 13]
    alone = run_request(gen, tmp_path / "alone", prompts=["green"], n=1, seed=12, batch_size=1)
    assert np.array_equal(pixels(Path(whole["images"][2]["file"])), pixels(Path(alone["images"][0]["file"])))


def test_training_sample_grid_uses_the_same_sampler(gen):
    """The training grids (FlowFamily.write_samples) and `vgen generate` call one sampler."""
    from vgen.families.base import SampleSettings
    from vgen.families.flow import FlowFamily

    task = FlowFamily(gen.cfg, 16, gen.device)
    settings = SampleSettings(steps=STEPS, guidance=3.0, sampler="euler")
    a = task.sample(gen.model, ["red", "cyan"], [3, 4], settings, contextlib.nullcontext, "cpu")
    request = GenerationRequest(prompts=["red", "cyan"], steps=STEPS, guidance=3.0).resolved(gen)
    b = sample_images(gen, ["red", "cyan"], [3, 4], request)
    assert torch.equal(a, b)


def test_metadata_round_trip(gen, tmp_path):
    summary = run_request(gen, tmp_path / "out", prompts=["a red square"], n=2, seed=7, negative_prompt="blue",
                          guidance=2.5, sampler="heun", grid=True)
    manifest = read_manifest(tmp_path / "out" / "generation.yaml", "generation", required=("model.sha256", "images"))
    assert manifest["model"]["sha256"] == gen.sha256 == sha256_file(gen.checkpoint / "ema.safetensors")
    assert manifest["model"]["step"] == 40 and manifest["settings"]["sampler"] == "heun"
    assert (tmp_path / "out" / "grid.png").is_file() and summary["grid"].endswith("grid.png")
    for row, image in zip(manifest["images"], summary["images"]):
        path = tmp_path / "out" / row["file"]
        assert str(path.resolve()) == image["file"] and sha256_file(path) == row["sha256"]
        assert row["file"].endswith("-a-red-square.png")
        meta = read_png_metadata(path)
        for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler"):
            assert meta[key] == row[key], key
        assert meta["model_sha256"] == gen.sha256 and meta["checkpoint_step"] == 40
        assert meta["parameters"] == (f"a red square\nNegative prompt: blue\nSteps: {STEPS}, Sampler: Heun, "
                                      f"CFG scale: 2.5, Seed: {row['seed']}, Size: 16x16, Model hash: "
                                      f"{gen.sha256[:10]}, Model: vgen-flow")
    with Image.open(tmp_path / "out" / manifest["images"][0]["file"]) as image:
        assert image.size == (16, 16) and "parameters" in image.text  # what other tools read


def test_cli_reads_stdin_and_prints_only_json(assets, tmp_path, vgen_cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("red\n\nblue\n"))
    out = tmp_path / "gen"
    result = vgen_cli("generate", "-", "--run", assets["run"], "-n", 2, "--steps", 3, "--out", out, "--grid", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout is the JSON and nothing else
    assert [(i["prompt"], i["seed"]) for i in summary["images"]] == [("red", 0), ("red", 1), ("blue", 2), ("blue", 3)]
    assert all(Path(i["file"]).is_file() for i in summary["images"])
    assert summary["timings"]["sample_s"] > 0 and Path(summary["grid"]).is_file()
    assert "wrote 4 images" in result.stderr
    again = vgen_cli("generate", "red", "--run", assets["run"], "--steps", 3, "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert vgen_cli("generate", "red", "--run", assets["run"], "--steps", 3, "--out", out, "--overwrite").exit_code == 0
    assert len(yaml.safe_load((out / "generation.yaml").read_text())["images"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["00000-red.png", "generation.yaml"]  # replaced, not merged


def write_square_image(path: Path, size: int = 32) -> Path:
    image = np.full((size, size, 3), 255, np.uint8)
    image[4:20, 6:26] = (255, 0, 0)
    image[20:30, 2:12] = (0, 0, 255)
    Image.fromarray(image).save(path)
    return path


def test_inpainting_keeps_the_unmasked_pixels(gen, tmp_path):
    init = write_square_image(tmp_path / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # regenerate the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    summary = run_request(gen, tmp_path / "out", prompts=["green"], n=2, init_image=init, mask=tmp_path / "mask.png")
    edit = load_edit_inputs(init, 16, 1.0, tmp_path / "mask.png")
    expected = ((edit.image + 1) * 127.5).round().permute(1, 2, 0).numpy()
    keep = edit.mask[0].numpy() == 0
    assert keep.any() and (~keep).any()
    for image in summary["images"]:
        out = pixels(Path(image["file"]))
        assert np.abs(out[keep] - expected[keep]).max() <= 1
        assert np.abs(out[~keep] - expected[~keep]).mean() > 5  # the masked half was regenerated
    assert read_png_metadata(summary["images"][0]["file"])["strength"] == 1.0


def test_sdedit_strength(gen, tmp_path):
    init = write_square_image(tmp_path / "init.png")
    expected = load_edit_inputs(init, 16).image
    expected = ((expected + 1) * 127.5).round().permute(1, 2, 0).numpy()
    light = run_request(gen, tmp_path / "light", prompts=["green"], n=2, init_image=init, strength=0.05)
    for image in light["images"]:
        assert np.abs(pixels(Path(image["file"])) - expected).mean() < 8
    full = run_request(gen, tmp_path / "full", prompts=["green"], n=2, init_image=init, strength=1.0)
    plain = run_request(gen, tmp_path / "plain", prompts=["green"], n=2)
    for a, b in zip(full["images"], plain["images"]):
        assert np.array_equal(pixels(Path(a["file"])), pixels(Path(b["file"])))
    assert torch.equal(truncate_grid(time_grid(10), 1.0), time_grid(10))
    assert truncate_grid(time_grid(10), 0.35).tolist() == pytest.approx([0.35, 0.3, 0.2, 0.1, 0.0])


def test_errors_are_clear_usage_errors(assets, tmp_path, vgen_cli):
    run = assets["run"]
    missing = vgen_cli("generate", "red", "--run", tmp_path / "nope")
    assert missing.exit_code == 2 and str(tmp_path / "nope") in missing.stderr
    dataset = vgen_cli("generate", "red", "--run", assets["data"])
    assert dataset.exit_code == 2 and "run.yaml" in dataset.stderr and "dataset" in dataset.stderr
    clip = tmp_path / "clip-run"
    clip.mkdir()
    write_manifest(clip / "run.yaml", "run", {"train_kind": "clip", "config": {"kind": "clip"}})
    wrong_kind = vgen_cli("generate", "red", "--run", clip)
    assert wrong_kind.exit_code == 2 and "flow" in wrong_kind.stderr and "clip" in wrong_kind.stderr

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    unreadable = vgen_cli("generate", "red", "--run", run, "--init-image", bad, "--strength", 0.5)
    assert unreadable.exit_code == 2 and str(bad) in unreadable.stderr
    init = write_square_image(tmp_path / "init.png", size=32)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "mask.png")
    wrong_size = vgen_cli("generate", "red", "--run", run, "--init-image", init, "--mask", tmp_path / "mask.png")
    assert wrong_size.exit_code == 2 and "24x20" in wrong_size.stderr and "32x32" in wrong_size.stderr
    no_step = vgen_cli("generate", "red", "--run", run, "--checkpoint", "7")
    assert no_step.exit_code == 2 and "[20, 40]" in no_step.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    busy = vgen_cli("generate", "red", "--run", run, "--out", tmp_path / "busy")
    assert busy.exit_code == 2 and (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    no_prompt = vgen_cli("generate", "--run", run)
    assert no_prompt.exit_code == 2 and "prompt" in no_prompt.stderr
    for result in (missing, dataset, wrong_kind, unreadable, wrong_size, no_step, busy, no_prompt):
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_relative_text_encoder_path_error_names_the_way_out(assets, tmp_path):
    from vgen.runs import resolve_text_source as _resolve_text_source

    manifest = {"environment": {"cwd": str(tmp_path / "gone")}}
    with pytest.raises(UsageError, match="directory `vgen train` ran in"):
        _resolve_text_source("run:no-such-encoder", tmp_path / "run", manifest, tmp_path / "run" / "run.yaml")
    found = _resolve_text_source("local-dir:tiny-clip", assets["run"], {}, assets["run"] / "run.yaml")
    assert found == f"local-dir:{(assets['root'] / 'tiny-clip').resolve()}"
    assert _resolve_text_source("random", tmp_path, {}, tmp_path / "run.yaml") == "random"
