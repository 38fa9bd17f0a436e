"""The captioner family: bytes as tokens, greedy and beam decoding, training that learns, `vgen
caption` and `vgen preprocess --caption-with`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.test_train import run, vgen_train_cmd, write_config
from tests.train_fixtures import COLOURS, colour_dataset, make_colour_squares, tiny_text_encoder
from vgen.families import caption_decoding
from vgen.models.captioner import END, IGNORE, VOCAB, ImageContext, batch_tokens, caption_tokens, tokens_caption
from vgen.understand.caption_metrics import _same_scene, caption_scores

TINY_CAPTIONER = ["kind=captioner", "captioner.image_encoder.mode=full", "captioner.network.width=32",
                  "captioner.network.depth=1", "captioner.network.heads=2", "captioner.max_bytes=16",
                  "captioner.sample_images=4", "captioner.val_caption_images=16", "train.batch_size=16",
                  "train.precision=fp32", "optim.lr=3e-3", "optim.warmup_steps=10", "ema.decay=0.9",
                  "train.log_every=10", "train.val_images=16"]


# --- bytes and scores ---------------------------------------------------------------------------


def test_captions_are_bytes_with_an_end_marker():
    assert caption_tokens("  a  cat\n", 16) == [*b"a cat", END]
    # cut at a character boundary: "é" is two bytes and does not fit in 4
    assert caption_tokens("caté", 4) == [*b"cat", END]
    assert tokens_caption([*"caté".encode(), END, 7, 8]) == "caté"
    inputs, targets = batch_tokens(["ab", "abcd"], 16)
    assert targets.tolist() == [[97, 98, END, IGNORE, IGNORE], [97, 98, 99, 100, END]]
    assert inputs.tolist() == [[97, 98, END, END, END], [97, 98, 99, 100, END]]


def test_caption_scores_count_the_same_scene_however_said():
    written = ["a dog and a cat", "a dog below a cat", "a cat above a dog", "a frog"]
    truths = [["a cat and a dog"], ["a cat above a dog"], ["a cat above a dog"], ["a cat"]]
    scores = caption_scores(written, truths)
    assert scores["n"] == 4 and scores["exact_match"] == 0.25
    assert scores["same_scene"] == 0.75 and scores["relation"] == 0.75
    assert scores["first_object"] == 0.25 and scores["second_object"] == pytest.approx(1 / 3)
    assert 0 < scores["bleu4"] < 1


@pytest.mark.parametrize("written, truth, same", [
    (("left", ("cat", "dog")), ("right", ("dog", "cat")), True),
    (("left", ("cat", "dog")), ("left", ("dog", "cat")), False),
    (("left", ("cat", "dog")), ("and", ("dog", "cat")), True),  # "and" does not say which side
    (("and", ("cat", "dog")), ("right", ("cat", "dog")), True),
    (("above", ("cat", "dog")), ("and", ("cat", "dog")), False),  # stacked is not side by side
    (("below", ("dog", "cat")), ("above", ("cat", "dog")), True),
    (("left", ("cat", "frog")), ("left", ("cat", "dog")), False),
    (("two", ("cat",)), ("two", ("cat",)), True),
    (("two", ("cat",)), ("and", ("cat", "cat")), False),
])
def test_same_scene_reads_where_each_object_stands(written, truth, same):
    assert _same_scene(written, truth) is same


# --- decoding ------------------------------------------------------------------------------------


class _Chain:
    """A fake decoder whose next-token distribution depends only on the last token: from the start
    'a' (0.6) or 'b' (0.4); after 'a' any of 5 bytes (0.2 each); after 'b' END (1.0); after any
    other byte END (1.0). Greedy writes 'a?' (probability 0.12), beam search 'b' (0.4)."""

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(last), VOCAB), -1e9)
        for i, t in enumerate(last.tolist()):
            if t == -1:
                out[i, ord("a")], out[i, ord("b")] = np.log(0.6), np.log(0.4)
            elif t == ord("a"):
                out[i, 100:105] = np.log(0.2)
            else:
                out[i, END] = 0.0
        return out

    def start_decoding(self, context, use_cache=True):
        state = {"last": torch.full((context.tokens.shape[0],), -1), "keys": None, "text": None,
                 "text_mask": None, "x": None, "caches": None}
        return self._logits(state["last"]), state

    def next_logits(self, token, state):
        state["last"] = token
        return self._logits(token)

    @staticmethod
    def reorder(state, rows):
        state["last"] = state["last"][rows]


def test_beam_search_finds_the_likelier_caption_greedy_misses():
    context = ImageContext(torch.zeros(3, 2, 4), torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 4))
    greedy = caption_decoding.greedy(_Chain(), context, 8)
    assert [tokens_caption(r) for r in greedy.tolist()] == ["a" + chr(100)] * 3
    beam = caption_decoding.beam_search(_Chain(), context, 8, beams=3)
    assert [tokens_caption(r) for r in beam.tolist()] == ["b"] * 3


def test_beam_search_with_and_without_the_cache_agree_on_a_real_decoder():
    """Beams are reordered every step: the cached keys and values must follow them (reorder)."""
    from vgen.models.ar import ArNetworkConfig, TokenTransformer

    torch.manual_seed(1)
    net = TokenTransformer(ArNetworkConfig(width=32, depth=2, heads=2, conditioning="cross"), VOCAB, 0, 16, sequence=9)
    with torch.no_grad():
        net.head.weight.mul_(5)
    context = ImageContext(torch.randn(3, 4, 16), torch.ones(3, 4, dtype=torch.bool), torch.zeros(3, 16))
    cached = caption_decoding.beam_search(net, context, 8, beams=3)
    plain = caption_decoding.beam_search(net, context, 8, beams=3, use_cache=False)
    assert torch.equal(cached, plain)
    assert cached.shape == (3, 9)


def test_beam_of_one_is_greedy_on_a_real_decoder():
    from vgen.models.ar import ArNetworkConfig, TokenTransformer

    torch.manual_seed(0)
    net = TokenTransformer(ArNetworkConfig(width=32, depth=1, heads=2, conditioning="cross"), VOCAB, 0, 16, sequence=9)
    with torch.no_grad():  # sharpen the untrained logits so that the argmax is not a near-tie
        net.head.weight.mul_(20)
    context = ImageContext(torch.randn(5, 4, 16), torch.ones(5, 4, dtype=torch.bool), torch.zeros(5, 16))
    greedy = caption_decoding.greedy(net, context, 8)
    beam = caption_decoding.beam_search(net, context, 8, beams=1)
    assert [tokens_caption(r) for r in greedy.tolist()] == [tokens_caption(r) for r in beam.tolist()]


# --- training and the commands -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A captioner trained 150 steps on squares captioned with their colour, reading a (trained
    along) tiny CLIP tower."""
    root = tmp_path_factory.mktemp("captioner")
    data = colour_dataset(root)
    out = root / "run"
    sets = [*TINY_CAPTIONER, f"captioner.image_encoder.source=local-dir:{tiny_text_encoder(root)}",
            "train.steps=150", "train.checkpoint_every=150", "train.val_every=150", "train.sample_every=150"]
    result = run(vgen_train_cmd(write_config(root / "c.yaml", sets), data, out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "run": out, "root": root}


@pytest.mark.slow
def test_captioner_learns_to_name_colours(trained, vgen_cli):
    metrics = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.3 * losses[0], losses
    assert [m["val_exact_match"] for m in metrics if "val_exact_match" in m][-1] >= 0.8
    assert (trained["run"] / "samples" / "step-00000150.png").is_file()
    for decoder in ("greedy", "beam"):
        result = vgen_cli("caption", trained["data"], "--run", trained["run"], "--split", "train", "--decoder", decoder,
                          "--json")
        assert result.exit_code == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        scores = lines[-1]["summary"]["scores"]
        assert scores["n"] == len(lines) - 1 and scores["exact_match"] >= 0.8, scores
    # a captioner draws no images
    refused = vgen_cli("generate", "red", "--run", trained["run"], "--out", trained["root"] / "gen")
    assert refused.exit_code == 2 and "vgen caption" in refused.stderr


@pytest.mark.slow
def test_caption_sidecars_and_batch_invariance(trained, vgen_cli, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        image = np.full((32, 32, 3), 255, np.uint8)  # twice the tower's size: resized to it
        image[6:26, 6:26] = rgb
        Image.fromarray(image).save(folder / f"{name}.png")
    (folder / "red.txt").write_text("mine\n")
    Image.open(folder / "blue.png").save(folder / "blue.jpg")  # blue.jpg writes blue.txt first
    result = vgen_cli("caption", folder, "--run", trained["run"], "--write-sidecars", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    assert summary["sidecars"]["written"] == 5 and summary["sidecars"]["kept"] == [str(folder / "red.txt")]
    assert summary["sidecars"]["refused"] == [{"sidecar": str(folder / "blue.txt"),
                                               "reason": "another image of the same name already has it"}]
    assert (folder / "red.txt").read_text() == "mine\n" and "--overwrite" in result.stderr
    written = {p.stem: p.read_text().strip() for p in folder.glob("*.txt")}
    assert sum(written[name] == name for name in COLOURS if name != "red") >= 4, (written, result.stderr)
    # the same seeds give the same sampled captions alone or with the others
    alone = vgen_cli("caption", folder / "green.png", "--run", trained["run"], "--decoder", "sample",
                     "--temperature", "0.5", "--seed", "1", "--json")
    index = [json.loads(line)["image"] for line in result.stdout.splitlines()[:-1]].index(str(folder / "green.png"))
    with_seed = vgen_cli("caption", folder, "--run", trained["run"], "--decoder", "sample", "--temperature", "0.5",
                         "--seed", str(1 - index), "--json")
    rows = [json.loads(line) for line in with_seed.stdout.splitlines()[:-1]]
    assert json.loads(alone.stdout.splitlines()[0])["caption"] == rows[index]["caption"]


@pytest.mark.slow
def test_preprocess_captions_the_images_without_a_caption(trained, vgen_cli, tmp_path):
    raw = make_colour_squares(tmp_path, per_colour=4)
    removed = sorted(raw.glob("*.txt"))[::2]
    for path in removed:
        path.unlink()
    out = tmp_path / "ds"
    result = vgen_cli("preprocess", raw, "-o", out, "--resolution", "16", "--workers", "1",
                      "--caption-with", trained["run"], "--json")
    assert result.exit_code == 0, result.stderr
    manifest = yaml.safe_load((out / "dataset.yaml").read_text())
    counts = manifest["counts"]
    assert set(counts["skipped_by_reason"]) <= {"duplicate"}  # same square drawn twice; no caption is missing
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    generated = [r for r in rows if r.get("generated_caption")]
    uncaptioned = {p.with_suffix(".png").name for p in removed}
    assert {r["source"] for r in generated} == uncaptioned & {r["source"] for r in rows}
    assert manifest["captions"]["generated"] == len(generated) >= 10
    assert manifest["captions"]["generated_by"]["run"] == str(trained["run"].resolve())
    assert sum(r["captions"] == [r["source"].split("-")[0]] for r in generated) >= len(generated) - 2
    # without the captioner those images are skipped, and the manifest has no generated counts
    plain = vgen_cli("preprocess", raw, "-o", tmp_path / "plain", "--resolution", "16", "--workers", "1")
    assert plain.exit_code == 0
    plain_manifest = yaml.safe_load((tmp_path / "plain" / "dataset.yaml").read_text())
    assert plain_manifest["counts"]["skipped_by_reason"]["no_caption"] == len(removed)
    assert "generated" not in plain_manifest["captions"]


def test_caption_refuses_what_it_cannot_use(vgen_cli, tmp_path):
    from vgen.manifest import write_manifest

    run_dir = tmp_path / "clip-run"
    run_dir.mkdir()
    write_manifest(run_dir / "run.yaml", "run", {"train_kind": "clip", "config": {"kind": "clip"}})
    shutil.copy(__file__, tmp_path / "x.png")  # not an image
    cases = [
        (("caption", tmp_path / "missing.png", "--run", run_dir), "no such file"),
        (("caption", tmp_path / "x.png", "--run", run_dir, "--decoder", "magic"), "--decoder"),
        (("caption", tmp_path / "x.png", "--run", run_dir), "writes no captions"),
        (("caption", run_dir, "--run", run_dir, "--write-sidecars"), "no images"),
    ]
    for args, message in cases:
        result = vgen_cli(*args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)


@pytest.mark.slow
def test_evaluate_reports_how_often_the_captioner_reads_the_prompt(trained, vgen_cli, tmp_path):
    """caption-agreement: the captioner reads each image of a generation dir; its caption is
    compared with the image's prompt (here: squares, half of them under a wrong colour's prompt)."""
    from vgen.manifest import write_manifest

    gen = tmp_path / "gen"
    gen.mkdir()
    rows, names = [], list(COLOURS)
    for i, name in enumerate(names):
        image = np.full((16, 16, 3), 255, np.uint8)
        image[3:13, 3:13] = COLOURS[name]
        Image.fromarray(image).save(gen / f"{i}.png")
        prompt = name if i % 2 == 0 else names[(i + 1) % len(names)] + " <b>"
        rows.append({"file": f"{i}.png", "prompt": prompt})
    write_manifest(gen / "generation.yaml", "generation", {"images": rows})
    out = tmp_path / "eval"
    result = vgen_cli("evaluate", gen, "--data", trained["data"], "--out", out, "--metrics", "caption-agreement",
                      "--captioner", trained["run"], "--json")
    assert result.exit_code == 0, result.stderr
    metric = yaml.safe_load((out / "evaluation.yaml").read_text())["metrics"]["caption-agreement"]
    assert metric["n"] == 6 and metric["value"]["exact_match"] == pytest.approx(0.5, abs=0.17)
    report = (out / "report.html").read_text()
    assert "Caption agreement" in report and "&lt;b&gt;" in report and " <b>" not in report
    wrong = vgen_cli("evaluate", gen, "--data", trained["data"], "--out", tmp_path / "e3", "--metrics",
                     "caption-agreement", "--captioner", tmp_path / "no-run")
    assert wrong.exit_code == 2 and "no-run" in wrong.stderr and not (tmp_path / "e3").exists()
    missing = vgen_cli("evaluate", gen, "--data", trained["data"], "--out", tmp_path / "e2", "--metrics",
                       "caption-agreement", "--json")
    assert missing.exit_code == 0
    assert "--captioner" in yaml.safe_load((tmp_path / "e2" / "evaluation.yaml").read_text())["metrics"][
        "caption-agreement"]["unavailable"]


def test_a_frozen_tower_is_on_the_device_and_not_in_the_weights(tmp_path):
    from vgen.families import build_family
    from vgen.families.config import train_config_from_dict

    cfg = train_config_from_dict({"kind": "captioner", "captioner": {
        "image_encoder": {"source": f"local-dir:{tiny_text_encoder(tmp_path)}", "mode": "frozen"},
        "network": {"width": 32, "depth": 1, "heads": 2, "conditioning": "cross"}, "max_bytes": 8}})
    family = build_family(cfg, 16, torch.device("cpu"))
    model = family.model
    assert not any(k.startswith(("tower.", "_frozen_tower.")) for k in model.state_dict())
    assert {p.device for p in model.image_tower.parameters()} == {torch.device("cpu")}
    inputs, targets = batch_tokens(["red", "blue"], 8)
    logits = model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), inputs)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert all(p.grad is not None for p in model.network.parameters() if p.requires_grad)
    with pytest.raises(Exception, match="text_lexical"):
        train_config_from_dict({"kind": "captioner", "captioner": {"network": {"text_lexical": True}}})
