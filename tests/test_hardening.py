"""What a careless or hostile user can do to the four commands (issue 11), case by case: nothing they
type loses data, and every artifact is what it claims (each test failed before its fix)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.test_train import TINY_FLOW
from tests.train_fixtures import colour_dataset, make_colour_squares, tiny_text_encoder
from vgen.manifest import sha256_file
from vgen.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
FLOW_STEPS = ["train.steps=10", "train.checkpoint_every=5", "train.val_every=1000", "train.sample_every=1000"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    data = colour_dataset(root)
    text = tiny_text_encoder(root)
    config = root / "flow.yaml"
    from vgen.config import apply_overrides

    config.write_text(yaml.safe_dump(apply_overrides({}, [*TINY_FLOW, f"text_encoder.source=local-dir:{text}",
                                                          *FLOW_STEPS])))
    return {"root": root, "data": data, "text": text, "config": config}


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """A finished 10-step run (checkpoints 5 and 10), never modified by the tests (they copy it)."""
    from vgen.families.config import load_train_config
    from vgen.train.loop import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_train_config(assets["config"]), assets["data"], run)
    return run


@contextmanager
def lock_held_elsewhere(target: Path):
    """Another process holding the output lock of `target` until the block ends; yields its pid."""
    code = textwrap.dedent(f"""
        import sys
        from vgen.outputs import OutputLock
        OutputLock({str(target)!r}).acquire()
        print("locked", flush=True)
        sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def train_args(assets, out, *sets):
    args = ["train", "-c", assets["config"], "-d", assets["data"], "-o", out]
    for s in sets:
        args += ["--set", s]
    return args


# 1. preprocess --overwrite deleted whatever was at -o, even the parent of its input.
def test_preprocess_overwrite_never_deletes_the_input_or_a_foreign_folder(vgen_cli, tmp_path):
    sand = tmp_path / "sand"
    raw = make_colour_squares(sand, per_colour=2)
    result = vgen_cli("preprocess", raw, "-o", sand, "-r", 16, "--overwrite")
    assert result.exit_code == 2 and "raw folder" in result.stderr
    assert len(list(raw.glob("*.png"))) == 12  # the input is intact
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    result = vgen_cli("preprocess", raw, "-o", foreign, "-r", 16, "--overwrite")
    assert result.exit_code == 2 and "not a dataset dir" in result.stderr
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
    # An empty folder is written without --overwrite; an earlier dataset is what --overwrite replaces.
    (tmp_path / "ds").mkdir()
    assert vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", 16).exit_code == 0
    assert vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", 16).exit_code == 2
    assert vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", 16, "--overwrite").exit_code == 0


# 2. Two generations into one --out both "succeeded" and one set was silently lost.
def test_generate_into_an_out_dir_in_use_is_refused(vgen_cli, trained, tmp_path):
    out = tmp_path / "gen"
    with lock_held_elsewhere(out) as pid:
        result = vgen_cli("generate", "red", "--run", trained, "--out", out, "--steps", 2)
    assert result.exit_code == 1 and "is in use" in result.stderr and f"pid {pid}" in result.stderr
    assert not out.exists()


def test_default_generation_dirs_are_unique_within_a_second(trained, tmp_path, monkeypatch):
    import vgen.generate as G
    from vgen.runs import load_run

    class Frozen(G._dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return G._dt.datetime(2026, 12, 1, 12, 0, 0)

    monkeypatch.setattr(G._dt, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    gen = load_run(trained, device="cpu")
    request = G.GenerationRequest(prompts=["red"], steps=2)
    first = G.generate(gen, request, warn=lambda m: None)["out_dir"]
    second = G.generate(gen, request, warn=lambda m: None)["out_dir"]
    assert Path(first).name == "20261201-120000" and Path(second).name == "20261201-120000-2"
    assert (Path(first) / "generation.yaml").is_file() and (Path(second) / "generation.yaml").is_file()


# 3. Two `vgen train` on one --out both ran, interleaving checkpoints and metrics.
def test_train_on_a_run_dir_in_use_is_refused(vgen_cli, assets, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: sha256_file(p / "model.safetensors") for p in list_checkpoints(run)}
    with lock_held_elsewhere(run) as pid:
        result = vgen_cli(*train_args(assets, run, "train.steps=20"))
    assert result.exit_code == 1 and f"pid {pid}" in result.stderr and "is in use" in result.stderr
    assert {p.name: sha256_file(p / "model.safetensors") for p in list_checkpoints(run)} == before


# 4. Resume with every checkpoint damaged started from step 0 and pruned the old checkpoints.
def test_resume_with_every_checkpoint_damaged_is_refused(vgen_cli, assets, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for checkpoint in list_checkpoints(run):
        weights = checkpoint / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    ema = {p.name: sha256_file(p / "ema.safetensors") for p in list_checkpoints(run)}
    result = vgen_cli(*train_args(assets, run, "train.steps=20"))
    assert result.exit_code == 1 and "every checkpoint is damaged" in result.stderr
    assert "step-00000005" in result.stderr and "model.safetensors" in result.stderr and "--start-over" in result.stderr
    assert {p.name: sha256_file(p / "ema.safetensors") for p in list_checkpoints(run)} == ema  # untouched
    result = vgen_cli(*train_args(assets, run), "--start-over")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (run / "set-aside-1").iterdir()) == ["metrics.jsonl", *sorted(ema)]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005", "step-00000010"]  # trained anew


def test_damaged_newer_checkpoints_are_set_aside_not_left_to_prune_the_good_ones(vgen_cli, assets, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = list_checkpoints(run)[-1]
    (newest / "ema.safetensors").write_bytes(b"garbage")
    result = vgen_cli(*train_args(assets, run, "train.steps=15", "train.keep_checkpoints=1"))
    assert result.exit_code == 0, result.stderr
    assert "moved 1 damaged checkpoints" in result.stderr and "resuming from" in result.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step-00000015"]  # trained on from step 5
    assert (run / "set-aside-1" / newest.name / "ema.safetensors").read_bytes() == b"garbage"


def test_a_run_killed_without_a_word_is_marked_when_next_claimed(vgen_cli, assets, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    manifest = yaml.safe_load((run / "run.yaml").read_text())
    manifest["status"] = "running"  # what a SIGKILL leaves
    (run / "run.yaml").write_text(yaml.safe_dump(manifest))
    other = tmp_path / "other.yaml"
    other.write_text(assets["config"].read_text().replace("depth: 2", "depth: 3"))
    result = vgen_cli("train", "-c", other, "-d", assets["data"], "-o", run)  # refused: another config
    assert result.exit_code == 2
    manifest = yaml.safe_load((run / "run.yaml").read_text())
    assert manifest["status"] == "interrupted" and "killed" in manifest["error"]


# 5. A flipped byte in a shard, or an edited caption, trained without a word.
@pytest.mark.parametrize("damage", ["shard", "caption"])
def test_training_refuses_a_dataset_changed_after_preprocess(vgen_cli, assets, tmp_path, damage):
    data = tmp_path / "ds"
    shutil.copytree(assets["data"], data)
    if damage == "shard":
        target = next((data / "shards").glob("train-*.safetensors"))
        raw = bytearray(target.read_bytes())
        raw[-5] ^= 0x01
        target.write_bytes(bytes(raw))
    else:
        target = data / "index.jsonl"
        target.write_text(target.read_text().replace('"red"', '"blue"', 1))
    result = vgen_cli("train", "-c", assets["config"], "-d", data, "-o", tmp_path / "run")
    assert result.exit_code == 1 and target.name in result.stderr and "does not match" in result.stderr
    assert not (tmp_path / "run").exists()


def test_dataset_verdict_is_cached_by_size_and_mtime(assets, tmp_path, monkeypatch):
    import vgen.manifest
    from vgen.data.dataset import ImageCaptionDataset

    data = tmp_path / "ds"
    shutil.copytree(assets["data"], data)
    hashed = []
    real = vgen.manifest.sha256_file
    monkeypatch.setattr(vgen.manifest, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    ImageCaptionDataset(data, "train")
    assert "index.jsonl" in hashed and any(name.endswith(".safetensors") for name in hashed)
    hashed.clear()
    ImageCaptionDataset(data, "train")
    ImageCaptionDataset(data, "val")
    assert hashed == []  # verified once, free afterwards
    (data / "index.jsonl").touch()  # a new mtime: hashed again (and still intact)
    ImageCaptionDataset(data, "train")
    assert hashed == ["index.jsonl"]


# 6. evaluate read (and embedded in its report) files outside the generation dir.
@pytest.mark.parametrize("escape", ["../outside.png", "absolute", "symlink"])
def test_evaluate_reads_only_files_inside_the_generation_dir(vgen_cli, trained, assets, tmp_path, escape):
    gen_dir = tmp_path / "gen"
    assert vgen_cli("generate", "red", "--run", trained, "--out", gen_dir, "--steps", 2).exit_code == 0
    manifest = yaml.safe_load((gen_dir / "generation.yaml").read_text())
    row = manifest["images"][0]
    secret = tmp_path / "outside.png"
    shutil.copy(gen_dir / row["file"], secret)
    if escape == "symlink":
        (gen_dir / row["file"]).unlink()
        (gen_dir / row["file"]).symlink_to(secret)
    else:
        row["file"] = str(secret) if escape == "absolute" else "../outside.png"
    (gen_dir / "generation.yaml").write_text(yaml.safe_dump(manifest))
    result = vgen_cli("evaluate", gen_dir, "--data", assets["data"], "--out", tmp_path / "eval",
                      "--metrics", "clip-score")
    assert result.exit_code == 2 and "only name files in its own directory" in result.stderr
    assert not (tmp_path / "eval").exists()


# 7. --guidance nan / inf were accepted (black images, `guidance: .nan` recorded); optim.lr=-1 was an
# internal error.
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_options_are_refused(vgen_cli, trained, assets, tmp_path, value):
    result = vgen_cli("generate", "red", "--run", trained, "--out", tmp_path / "g", "--guidance", value)
    assert result.exit_code == 2 and "not a finite number" in result.stderr and not (tmp_path / "g").exists()
    result = vgen_cli("evaluate", "--run", trained, "--benchmark", "emoji-scenes", "--data", assets["data"],
                      "--out", tmp_path / "e", "--guidance", value)
    assert result.exit_code == 2 and "not a finite number" in result.stderr
    result = vgen_cli(*train_args(assets, tmp_path / "r", f"optim.lr={value}"))
    assert result.exit_code == 2 and "optim.lr" in result.stderr and "finite" in result.stderr


@pytest.mark.parametrize("setting, message", [("optim.lr=-1", "optim.lr: expected a value > 0"),
                                              ("ema.decay=1.5", "ema.decay: expected a value >= 0 and < 1"),
                                              ("flow.cond_dropout=-0.1", "flow.cond_dropout"),
                                              ("flow.network.heads=0", "flow.network.heads"),
                                              ("flow.network.patch_size=5", "not a multiple of patch_size")])
def test_out_of_range_values_are_blamed_on_the_set_option(vgen_cli, assets, tmp_path, setting, message):
    result = vgen_cli(*train_args(assets, tmp_path / "r", setting))
    assert result.exit_code == 2 and f"--set {setting}" in result.stderr and message in result.stderr
    assert "internal error" not in result.stderr


def test_json_has_no_nan(vgen_cli, assets, tmp_path):
    result = vgen_cli(*train_args(assets, tmp_path / "run", "train.steps=5", "train.val_images=0"), "--json")
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))


def test_negative_guidance_is_refused_by_the_stage(trained, tmp_path):
    from vgen.errors import UsageError
    from vgen.generate import GenerationRequest
    from vgen.runs import load_run

    gen = load_run(trained, device="cpu")
    with pytest.raises(UsageError, match="--guidance"):
        GenerationRequest(prompts=["red"], guidance=-2.0).resolved(gen)


# 9. Misleading state.
def test_resume_with_another_dataset_is_refused(vgen_cli, assets, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    other = tmp_path / "other-ds"
    from vgen.data.preprocess import PreprocessOptions, preprocess

    preprocess(make_colour_squares(tmp_path, per_colour=3), other, PreprocessOptions(resolution=16))
    recorded = yaml.safe_load((run / "run.yaml").read_text())["dataset"]
    result = vgen_cli("train", "-c", assets["config"], "-d", other, "-o", run, "--set", "train.steps=20")
    assert result.exit_code == 2 and "another dataset" in result.stderr
    assert yaml.safe_load((run / "run.yaml").read_text())["dataset"] == recorded
    moved = tmp_path / "moved-ds"  # the same dataset at another path is the same data
    shutil.copytree(assets["data"], moved)
    assert vgen_cli("train", "-c", assets["config"], "-d", moved, "-o", run).exit_code == 0


def test_a_failed_run_says_failed_in_run_yaml(vgen_cli, assets, tmp_path, monkeypatch):
    import vgen.checkpoint as ckpt

    def disk_full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    run = tmp_path / "run"
    result = vgen_cli(*train_args(assets, run))
    assert result.exit_code == 1 and "internal error" not in result.stderr
    assert "no space left" in result.stderr and "step-00000005" in result.stderr  # names what it was writing
    manifest = yaml.safe_load((run / "run.yaml").read_text())
    assert manifest["status"] == "failed" and "no space left" in manifest["error"]


@pytest.mark.parametrize("where", ["dataset", "folder"])
def test_train_out_into_a_non_run_dir_is_refused(vgen_cli, assets, tmp_path, where):
    if where == "dataset":
        out = tmp_path / "ds"
        shutil.copytree(assets["data"], out)
    else:
        out = tmp_path / "notes"
        out.mkdir()
        (out / "todo.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    result = vgen_cli(*train_args(assets, out))
    assert result.exit_code == 2 and "not a run dir" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


# 10. Errors that named nothing.
def test_a_non_safetensors_checkpoint_is_named(vgen_cli, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    checkpoint = list_checkpoints(run)[-1]
    (checkpoint / "ema.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    state = yaml.safe_load((checkpoint / "checkpoint.yaml").read_text())
    state["files"]["ema"]["sha256"] = sha256_file(checkpoint / "ema.safetensors")  # consistent, still wrong
    (checkpoint / "checkpoint.yaml").write_text(yaml.safe_dump(state))
    result = vgen_cli("generate", "red", "--run", run, "--out", tmp_path / "g", "--steps", 2)
    assert result.exit_code == 1 and "ema.safetensors" in result.stderr and "not a readable safetensors" in result.stderr
    assert "internal error" not in result.stderr


def test_untrusted_text_in_the_metric_table_is_not_markup(vgen_cli, trained, assets, tmp_path):
    gen_dir = tmp_path / "gen"
    assert vgen_cli("generate", "red", "--run", trained, "--out", gen_dir, "--steps", 2).exit_code == 0
    result = vgen_cli("evaluate", gen_dir, "--data", assets["data"], "--out", tmp_path / "eval",
                      "--metrics", "clip-score", "--clip", "local-dir:/no/[bold]such[/]\x1b[2J")
    assert result.exit_code == 0, result.stderr
    assert "unavailable" in result.stderr and "[/]" in result.stderr and "\x1b" not in result.stderr


def test_non_utf8_prompts_on_stdin_are_a_usage_error(vgen_cli, trained, tmp_path, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8"))
    result = vgen_cli("generate", "-", "--run", trained, "--out", tmp_path / "g")
    assert result.exit_code == 2 and "not UTF-8" in result.stderr


def test_the_prompt_file_is_an_input_too(vgen_cli, trained, tmp_path):
    gen_dir = tmp_path / "gen"
    assert vgen_cli("generate", "red", "--run", trained, "--out", gen_dir, "--steps", 2).exit_code == 0
    (gen_dir / "prompts.txt").write_text("blue\n")
    result = vgen_cli("generate", "--prompts", gen_dir / "prompts.txt", "--run", trained, "--out", gen_dir,
                      "--overwrite", "--steps", 2)
    assert result.exit_code == 2 and "prompts file" in result.stderr and (gen_dir / "prompts.txt").exists()


def test_train_out_inside_the_dataset_is_refused(vgen_cli, assets, tmp_path):
    data = tmp_path / "ds"
    shutil.copytree(assets["data"], data)
    result = vgen_cli("train", "-c", assets["config"], "-d", data, "-o", data / "run")
    assert result.exit_code == 2 and "is inside the dataset" in result.stderr and not (data / "run").exists()


def test_a_missing_text_encoder_file_is_named(vgen_cli, assets, tmp_path):
    result = vgen_cli(*train_args(assets, tmp_path / "r", "text_encoder.source=nothere.safetensors"))
    assert result.exit_code == 2 and "nothere.safetensors: no such file" in result.stderr


def test_os_errors_name_the_path_not_an_internal_error(vgen_cli, tmp_path, monkeypatch):
    import vgen.data.preprocess as P

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/photos/cat.png")

    monkeypatch.setattr(P, "preprocess", denied)
    result = vgen_cli("preprocess", tmp_path, "-o", tmp_path / "ds")
    assert result.exit_code == 1 and "internal error" not in result.stderr
    assert "/srv/photos/cat.png" in result.stderr and "permission denied" in result.stderr


# 11. Small things.
def test_caption_control_characters_are_stripped_and_counted(vgen_cli, tmp_path):
    raw = make_colour_squares(tmp_path, per_colour=2)
    (raw / "red-000.txt").write_text("\x1b[31mred\x1b[0m square\x07\n")
    result = vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", 16, "--json")
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stderr
    assert "3 terminal control characters" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["captions"]["control_characters_removed"] == 3
    assert summary["captions"]["images_with_control_characters"] == 1
    rows = [json.loads(line) for line in (tmp_path / "ds" / "index.jsonl").read_text().splitlines()]
    assert next(r for r in rows if r["source"] == "red-000.png")["captions"] == ["red square"]


def test_a_terminal_never_receives_a_raw_escape_from_a_file_name(vgen_cli, tmp_path):
    raw = make_colour_squares(tmp_path, per_colour=2)
    (raw / "evil\x1b]0;pwned\x07\x1b[2J.png").write_bytes(b"not an image")
    result = vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", 16)
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J.png" in result.stderr  # shown, escaped


def test_a_prompt_longer_than_the_context_is_warned_and_recorded(vgen_cli, trained, tmp_path):
    prompt = "a red square on white next to a blue square on white"  # 14 tokens; the tiny context holds 8
    result = vgen_cli("generate", prompt, "red", "--run", trained, "--out", tmp_path / "g", "--steps", 2, "--json")
    assert result.exit_code == 0, result.stderr
    assert "needs 14 tokens" in result.stderr and "holds 8" in result.stderr
    assert json.loads(result.stdout)["truncated_prompts"] == [prompt]
    rows = yaml.safe_load((tmp_path / "g" / "generation.yaml").read_text())["images"]
    assert rows[0]["truncated"] == {"tokens": 14, "context": 8} and "truncated" not in rows[1]


def test_evaluate_gives_caveats_for_another_size_and_a_small_set(vgen_cli, trained, assets, tmp_path):
    import numpy as np
    from PIL import Image

    gen_dir = tmp_path / "gen"
    assert vgen_cli("generate", "red", "--run", trained, "--out", gen_dir, "--steps", 2, "-n", 2).exit_code == 0
    manifest = yaml.safe_load((gen_dir / "generation.yaml").read_text())
    for row in manifest["images"]:  # the same images at twice the dataset's size
        path = gen_dir / row["file"]
        Image.fromarray(np.asarray(Image.open(path).convert("RGB")).repeat(2, 0).repeat(2, 1)).save(path)
        row["sha256"] = sha256_file(path)
    (gen_dir / "generation.yaml").write_text(yaml.safe_dump(manifest))
    result = vgen_cli("evaluate", gen_dir, "--data", assets["data"], "--out", tmp_path / "eval",
                      "--metrics", "fd-clip,clip-score", "--json")
    assert result.exit_code == 0, result.stderr
    caveats = yaml.safe_load((tmp_path / "eval" / "evaluation.yaml").read_text())["caveats"]
    assert len(caveats) == 2 and "32x32" in caveats[0] and "16x16" in caveats[0] and "2 generated" in caveats[1]
    assert json.loads(result.stdout)["caveats"] == caveats
    assert "Caveat:" in (tmp_path / "eval" / "report.html").read_text() and "caveat:" in result.stderr


# 13. A --json summary alone on stdout for every command.
def test_every_command_has_a_json_summary(vgen_cli, assets, tmp_path):
    result = vgen_cli("data", "emoji-scenes", tmp_path / "raw", "--count", 12, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["count"] == 12
    result = vgen_cli("data", "emoji-scenes-prompts", tmp_path / "p.txt", "--per-relation", 2, "--json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["prompts"]) == 14
    result = vgen_cli("preprocess", tmp_path / "raw", "-o", tmp_path / "ds", "-r", 16, "--json")
    summary = json.loads(result.stdout)
    assert result.exit_code == 0 and summary["counts"]["kept"] == 12 and Path(summary["manifest"]).is_file()
    result = vgen_cli(*train_args(assets, tmp_path / "run", "train.steps=5"), "--json")
    summary = json.loads(result.stdout)
    assert result.exit_code == 0 and summary["status"] == "done" and summary["step"] == 5
    assert summary["last"]["train"]["step"] == 5 and len(summary["checkpoints"]) == 1
