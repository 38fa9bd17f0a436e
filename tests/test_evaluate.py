"""`vgen evaluate`: metrics on known cases through the whole command (a set scored against itself, a
copying "model", noise), the benchmark mode on a tiny emoji-scenes run with two checkpoints, the
report, the `unavailable` paths and clear usage errors.

One small emoji-scenes dataset (16 px) and a tiny flow run on it are built per module; the judge is
the one tests/test_judge.py trains into the pytest cache (trained here if that has not run).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.test_train import TINY_FLOW
from tests.train_fixtures import tiny_text_encoder
from vgen.config import apply_overrides
from vgen.data import emoji_scenes as es
from vgen.data.dataset import CACHE_DIR, ImageCaptionDataset
from vgen.errors import MissingDependencyError
from vgen.evaluate import features as FE
from vgen.evaluate import judge as J
from vgen.evaluate.evaluation import METRICS, EvalOptions
from vgen.evaluate.runner import evaluate_generation_dir
from vgen.manifest import sha256_file, write_manifest
from vgen.families.config import train_config_from_dict

RESOLUTION = 16

# Every test here uses a trained run and the real metrics: end-to-end, outside `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory, pytestconfig):
    """An emoji-scenes dataset (300 scenes at 16 px) and a tiny flow run with checkpoints at 10 and 20."""
    from vgen.data.preprocess import PreprocessOptions, preprocess
    from vgen.train.loop import train

    try:
        es.SceneRenderer()
    except MissingDependencyError as e:
        pytest.skip(f"the Noto emoji font is not installed: {e}")
    root = tmp_path_factory.mktemp("evaluate-assets")
    es.write_emoji_scenes(root / "raw", count=300, seed=0)
    data = root / "dataset"
    preprocess(root / "raw", data, PreprocessOptions(resolution=RESOLUTION, workers=1, val_fraction=0.1))
    tiny_text_encoder(root)
    sets = [*TINY_FLOW, f"text_encoder.source=local-dir:{root / 'tiny-clip'}", "train.steps=20",
            "train.checkpoint_every=10", "train.val_every=10", "train.sample_every=1000", "optim.lr=2e-3"]
    train(train_config_from_dict(apply_overrides({}, sets)), data, root / "run")
    return {"root": root, "data": data, "run": root / "run",
            "judge_cache": Path(pytestconfig.cache.mkdir("vgen-judge"))}


@pytest.fixture
def judge_cache(assets, monkeypatch):
    """The CLI uses the default judge cache: point it at the tests' one."""
    monkeypatch.setattr(J, "default_cache_dir", lambda: assets["judge_cache"])
    return assets["judge_cache"]


def write_generation_dir(folder: Path, images: list[np.ndarray], prompts: list[str]) -> Path:
    """A generation dir as `vgen generate` writes one (PNGs + generation.yaml), from given pixels."""
    folder.mkdir(parents=True)
    rows = []
    for i, (pixels, prompt) in enumerate(zip(images, prompts)):
        name = f"{i:05d}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append({"file": name, "prompt": prompt, "seed": i, "sha256": sha256_file(folder / name)})
    write_manifest(folder / "generation.yaml", "generation", {"model": {}, "settings": {}, "images": rows})
    return folder


def split_images(data: Path, split: str) -> tuple[list[np.ndarray], list[str]]:
    ds = ImageCaptionDataset(data, split)
    return ([ds.image(i).permute(1, 2, 0).numpy() for i in range(len(ds))], [c[0] for c in ds.captions])


@pytest.mark.slow
def test_metrics_on_known_sets(assets, judge_cache, tmp_path):
    """The val split scored as if generated: FID/FD ~0, precision and recall 1, memorisation like the
    baseline. Training images handed in as samples: every one flagged as a copy. Noise: far away."""
    val, val_prompts = split_images(assets["data"], "val")
    train, train_prompts = split_images(assets["data"], "train")
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8) for _ in val]
    options = EvalOptions(metrics=("fid", "precision-recall", "fd-clip", "memorization"),
                          clip=f"local-dir:{assets['root'] / 'tiny-clip'}", device="cpu")
    results = {}
    for name, images, prompts in (("real", val, val_prompts), ("copies", train[:len(val)], train_prompts),
                                  ("noise", noise, val_prompts)):
        gen_dir = write_generation_dir(tmp_path / name, images, prompts)
        results[name] = evaluate_generation_dir(gen_dir, assets["data"], tmp_path / f"eval-{name}", options)["metrics"]
    real, copies, noise = results["real"], results["copies"], results["noise"]
    assert abs(real["fid"]["value"]) < 1e-3 and abs(real["fd-clip"]["value"]) < 1e-6
    assert real["precision-recall"]["value"] == {"precision": 1.0, "recall": 1.0}
    assert noise["fid"]["value"] > 100 and noise["fd-clip"]["value"] > 1e-3
    assert noise["precision-recall"]["value"]["precision"] < 0.2
    assert copies["memorization"]["value"] == 1.0
    assert real["memorization"]["value"] == real["memorization"]["baseline"]["value"] < 0.5
    fid = real["fid"]
    assert fid["n_generated"] == len(val) and fid["n_real"] == len(val) and fid["reference"]["split"] == "val"
    assert fid["extractor_id"] == f"inception:{FE.INCEPTION_SHA256[:12]}" and fid["weights_sha256"] == FE.INCEPTION_SHA256
    assert "clean-fid" in fid["extractor"]["resize"]
    # The reference features were cached in the dataset dir, keyed by the extractor id.
    assert (assets["data"] / CACHE_DIR / f"reference-inception_{FE.INCEPTION_SHA256[:12]}-val.safetensors").is_file()


@pytest.mark.slow
def test_benchmark_with_checkpoints_and_report(assets, judge_cache, tmp_path, vgen_cli):
    out = tmp_path / "eval"
    result = vgen_cli("evaluate", "--run", assets["run"], "--benchmark", "emoji-scenes", "--data", assets["data"],
                      "--out", out, "--fid-images", "24", "--per-relation", "2", "--per-prompt", "2",
                      "--steps", "4", "--batch-size", "7", "--metrics", "fd-clip,clip-score,compositional,memorization",
                      "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = yaml.safe_load((out / "evaluation.yaml").read_text())
    assert manifest["kind"] == "evaluation" and manifest["checkpoint_step"] == 20
    assert set(manifest["metrics"]) == {"fd-clip", "clip-score", "compositional", "memorization"}
    # The sets: 24 FID images from the val captions; 2 prompts per relation x 2 seeds (7 relations over
    # training pairs, 5 over held-out pairs).
    assert len(list((out / "images" / "fid").glob("*.png"))) == 24
    comp = manifest["metrics"]["compositional"]
    assert comp["n"] == (7 + 5) * 2 * 2 and comp["two_object_held_out_pairs"]["n"] == 5 * 2 * 2
    assert set(comp["by_relation"]) == set(es.RELATIONS) and comp["judge"]["calibration"]["crop_present"] > 0.5
    assert comp["extractor_id"].startswith("emoji-scenes-judge:twemoji-16.0.0")
    verdicts = [yaml.safe_load(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == comp["n"] and sum(v["correct"] for v in verdicts) == comp["two_object"]["correct"] + sum(
        comp["by_relation"][r]["correct"] for r in ("single", "two"))
    # Every kept checkpoint: the earlier one on the benchmark set at one seed per prompt.
    assert [s["step"] for s in manifest["by_step"]] == [10, 20] and manifest["by_step"][0]["n"] == 24
    assert all(0 <= s["compositional"]["single_object"] <= 1 for s in manifest["by_step"])
    # The terminal table and the JSON headline.
    assert "compositional" in result.stderr and "report.html" in result.stderr
    assert '"fd-clip"' in result.stdout
    # The report: self-contained, with the metric table, verdict-marked grids per relation, plots.
    html = (out / "report.html").read_text()
    assert "<table>" in html and "FD (CLIP)" in html and "compositional accuracy" in html
    assert html.count('<img src="data:image/png;base64,') >= 12 * 2
    assert not re.search(r'(src|href)="(?!data:)', html), "the report must not load anything from outside"
    assert html.count("<svg") >= 2  # compositional accuracy by checkpoint, the training loss
    for relation in es.RELATIONS:
        assert f"<h3>{relation} " in html
    assert 'class=ok' in html or 'class=bad' in html
    # Same seeds, same settings: the same images and numbers again.
    again = tmp_path / "again"
    assert vgen_cli("evaluate", "--run", assets["run"], "--benchmark", "emoji-scenes", "--data", assets["data"],
                    "--out", again, "--fid-images", "24", "--per-relation", "2", "--per-prompt", "2", "--steps", "4",
                    "--batch-size", "24", "--metrics", "compositional", "--checkpoints", "latest",
                    "--device", "cpu").exit_code == 0
    second = yaml.safe_load((again / "evaluation.yaml").read_text())
    assert second["metrics"]["compositional"]["value"] == comp["value"] and second["by_step"] == []
    for png in (out / "images" / "benchmark").glob("*.png"):
        assert sha256_file(png) == sha256_file(again / "images" / "benchmark" / png.name)


def test_unavailable_metrics_do_not_stop_the_others(assets, tmp_path, monkeypatch):
    val, _ = split_images(assets["data"], "val")
    gen_dir = write_generation_dir(tmp_path / "gen", val[:6], ["a red square"] * 6)
    monkeypatch.setattr(FE, "inception_weights_path",
                        lambda package_dir=None: (_ for _ in ()).throw(MissingDependencyError("no Inception here")))
    options = EvalOptions(metrics=METRICS, clip="random", device="cpu")
    manifest = evaluate_generation_dir(gen_dir, assets["data"], tmp_path / "eval", options)
    metrics = manifest["metrics"]
    assert metrics["fid"] == {"unavailable": "no Inception here"} and "unavailable" in metrics["kid"]
    assert "randomly initialised" in metrics["clip-score"]["unavailable"]
    assert "not an emoji-scenes caption" in metrics["compositional"]["unavailable"]
    assert metrics["memorization"]["n_generated"] == 6  # still computed
    assert manifest["headline"]["fid"] == {"unavailable": "no Inception here"}
    assert "unavailable: no Inception here" in (tmp_path / "eval" / "report.html").read_text()


def test_missing_twemoji_makes_compositional_unavailable(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("VGEN_TWEMOJI_DIR", str(tmp_path / "nowhere"))
    val, prompts = split_images(assets["data"], "val")
    gen_dir = write_generation_dir(tmp_path / "gen", val[:4], prompts[:4])
    options = EvalOptions(metrics=("compositional",), judge_cache=tmp_path / "judge")
    metrics = evaluate_generation_dir(gen_dir, assets["data"], tmp_path / "eval", options)["metrics"]
    assert "make setup" in metrics["compositional"]["unavailable"]


def test_usage_errors(assets, tmp_path, vgen_cli):
    data, run = assets["data"], assets["run"]
    cases = [
        (("evaluate", "--data", data, "--out", tmp_path / "e"), "give one of GEN_DIR"),
        (("evaluate", tmp_path, "--run", run, "--benchmark", "emoji-scenes", "--data", data, "--out", tmp_path / "e"),
         "give one of GEN_DIR"),
        (("evaluate", "--run", run, "--data", data, "--out", tmp_path / "e"), "--benchmark emoji-scenes"),
        (("evaluate", "--run", run, "--benchmark", "coco", "--data", data, "--out", tmp_path / "e"), "unknown 'coco'"),
        (("evaluate", tmp_path, "--data", data, "--out", tmp_path / "e", "--metrics", "fid,iq"), "unknown 'iq'"),
        (("evaluate", tmp_path / "missing", "--data", data, "--out", tmp_path / "e"), "no such directory"),
        (("evaluate", data, "--data", data, "--out", tmp_path / "e"), "no generation.yaml"),
        (("evaluate", "--run", run, "--benchmark", "emoji-scenes", "--data", data, "--out", tmp_path / "e",
          "--checkpoints", "15"), "no checkpoint at step 15"),
    ]
    for args, message in cases:
        result = vgen_cli(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr, (message, result.stderr)
        assert "Traceback" not in result.stderr
    # An existing evaluation is kept unless --overwrite.
    val, prompts = split_images(data, "val")
    gen_dir = write_generation_dir(tmp_path / "gen", val[:3], prompts[:3])
    args = ("evaluate", gen_dir, "--data", data, "--out", tmp_path / "eval", "--metrics", "memorization")
    assert vgen_cli(*args).exit_code == 0
    result = vgen_cli(*args)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert vgen_cli(*args, "--overwrite").exit_code == 0
    # A PNG changed after generation is refused (the sha256 in generation.yaml no longer matches).
    Image.fromarray(np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)).save(gen_dir / "00000.png")
    result = vgen_cli(*args, "--overwrite")
    assert result.exit_code == 1 and "changed after it was generated" in result.stderr  # damaged data: runtime


def test_zero_step_run_is_the_untrained_baseline(assets, tmp_path):
    """train.steps=0 writes the initialised network as checkpoint 0 (the baseline FID is compared
    against), and running it again finds it done."""
    from vgen.runs import load_run
    from vgen.train.loop import train

    sets = [*TINY_FLOW, f"text_encoder.source=local-dir:{assets['root'] / 'tiny-clip'}", "train.steps=0"]
    cfg = train_config_from_dict(apply_overrides({}, sets))
    for _ in range(2):
        result = train(cfg, assets["data"], tmp_path / "zero")
        assert (result["step"], result["done"], result["status"]) == (0, True, "done")
    assert [p.name for p in (tmp_path / "zero" / "checkpoints").iterdir()] == ["step-00000000"]
    assert yaml.safe_load((tmp_path / "zero" / "run.yaml").read_text())["status"] == "done"
    assert load_run(tmp_path / "zero", device="cpu").step == 0
