"""The autoregressive family: a transformer over image tokens whose decoding (with and without the
KV cache) agrees with teacher forcing, token sampling with known answers, and, end to end, a tokenizer
run and an ar run that learns, generates through `vgen generate`, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from vgen.families.ar_sampling import filter_logits, gumbel_choice, sample_tokens
from vgen.models.ar import ArNetworkConfig, TokenTransformer, rotary_2d, rotate
from vgen.text.encoder import TextFeatures


def features(batch: int, length: int = 5, width: int = 16, seed: int = 0, pad_from: int | None = 3) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad_from is not None:
        mask[0, pad_from:] = False  # the first caption is shorter: padding keys must not matter
    return TextFeatures(torch.randn(batch, length, width, generator=g), mask, torch.randn(batch, 8, generator=g),
                        torch.randn(batch, length, width, generator=g))


def tiny_network(conditioning: str = "prefix", grid: int = 3, codebook: int = 11) -> TokenTransformer:
    torch.manual_seed(0)
    cfg = ArNetworkConfig(width=32, depth=2, heads=2, conditioning=conditioning, text_refiner_layers=1,
                          text_lexical=True)
    return TokenTransformer(cfg, codebook, grid, text_width=16).eval()


def test_rotary_positions_make_attention_depend_on_the_relative_place():
    cos, sin = rotary_2d(8, 4, 100.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(a: int, b: int) -> float:  # grid positions in raster order
        return (rotate(q.view(1, 1, 1, 8), cos[a:a + 1], sin[a:a + 1]) *
                rotate(k.view(1, 1, 1, 8), cos[b:b + 1], sin[b:b + 1])).sum().item()

    assert torch.equal(cos[0], torch.ones(4)) and torch.equal(sin[0], torch.zeros(4))  # (0, 0): no rotation
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-6)
    # (row 1, col 2) against (row 0, col 1) is the same offset as (2, 3) against (1, 2) ...
    assert score(1 * 4 + 2, 0 * 4 + 1) == pytest.approx(score(2 * 4 + 3, 1 * 4 + 2), abs=1e-5)
    # ... and a different offset gives a different score
    assert score(1 * 4 + 2, 0 * 4 + 1) != pytest.approx(score(2 * 4 + 3, 2 * 4 + 2), abs=1e-3)
    # row and column turn different channel pairs: moving by a row is not moving by a column
    assert score(4, 0) != pytest.approx(score(1, 0), abs=1e-3)


def test_filter_logits_known_answers():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.isinf(filter_logits(logits, 1.0, top_k=2)).tolist() == [[False, False, True]]
    assert torch.isinf(filter_logits(logits, 1.0, top_p=0.6)).tolist() == [[False, False, True]]
    assert torch.isinf(filter_logits(logits, 1.0, top_p=0.5)).tolist() == [[False, True, True]]
    assert torch.isinf(filter_logits(logits, 1.0, top_p=1.0)).tolist() == [[False, False, False]]
    shuffled = logits[:, [2, 0, 1]]  # filtering follows the values, not the positions
    assert torch.isinf(filter_logits(shuffled, 1.0, top_p=0.6)).tolist() == [[True, False, False]]
    torch.testing.assert_close(filter_logits(logits, 0.5), logits * 2)
    ties = filter_logits(torch.tensor([[1.0, 1.0, 0.0]]), 1.0, top_k=1)  # exactly k tokens, also on a tie
    assert torch.isinf(ties).sum() == 2


def test_gumbel_choice_samples_the_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(20000, 3)
    chosen = gumbel_choice(logits, torch.rand(20000, 3, generator=g))
    freq = torch.bincount(chosen, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015, rtol=0)
    masked = gumbel_choice(filter_logits(logits, 1.0, top_k=1), torch.rand(20000, 3, generator=g))
    assert torch.all(masked == 0)


@pytest.mark.parametrize("conditioning", ["prefix", "cross"])
def test_decoding_with_and_without_the_cache_agrees_with_teacher_forcing(conditioning):
    net, text = tiny_network(conditioning), features(2)
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        forced = net(tokens, text)  # [2, 9, 11]
        for use_cache in (True, False):
            logits, state = net.start_decoding(text, use_cache)
            stepped = [logits]
            for k in range(8):
                stepped.append(net.next_logits(tokens[:, k], state))
            torch.testing.assert_close(torch.stack(stepped, dim=1), forced, atol=1e-5, rtol=1e-5)


def test_the_logits_of_token_k_see_only_the_caption_and_earlier_tokens():
    net, text = tiny_network(), features(1, pad_from=None)
    tokens = torch.randint(0, 11, (1, 9), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[0, 4] = (tokens[0, 4] + 1) % 11
    with torch.no_grad():
        a, b = net(tokens, text), net(changed, text)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])
    other = features(1, seed=7, pad_from=None)
    with torch.no_grad():
        assert not torch.allclose(net(tokens, other)[:, 0], a[:, 0])  # the caption conditions token 0


@pytest.mark.parametrize("conditioning", ["prefix", "cross"])
def test_padding_of_the_caption_changes_nothing(conditioning):
    net = tiny_network(conditioning)
    text = features(1, pad_from=None)
    longer = TextFeatures(*(torch.cat([part, part[:, :2]], dim=1) if part.dim() > 1 and i != 2 else part
                            for i, part in enumerate(text)))
    longer.mask[:, 5:] = False  # two more positions, padding
    tokens = torch.randint(0, 11, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(net(tokens, longer), net(tokens, text), atol=1e-5, rtol=1e-5)


def test_sampled_tokens_depend_on_the_seed_alone_and_not_on_the_cache_or_batch():
    net = tiny_network()
    cond, uncond = features(3, seed=1), features(3, seed=2)
    kwargs = dict(guidance=2.0, temperature=1.0, top_k=0, top_p=0.9)
    together = sample_tokens(net, cond, uncond, [5, 6, 7], 9, **kwargs)
    assert together.shape == (3, 9) and together.min() >= 0 and together.max() < 11
    for i, seed in enumerate([5, 6, 7]):
        one = [TextFeatures(*(part[i:i + 1] for part in f)) for f in (cond, uncond)]
        assert torch.equal(sample_tokens(net, *one, [seed], 9, **kwargs), together[i:i + 1])
    assert torch.equal(sample_tokens(net, cond, uncond, [5, 6, 7], 9, use_cache=False, **kwargs), together)
    assert not torch.equal(sample_tokens(net, cond, uncond, [8, 9, 10], 9, **kwargs), together)
    greedy = sample_tokens(net, cond, uncond, [5, 6, 7], 9, guidance=1.0, temperature=1.0, top_k=1)
    with torch.no_grad():  # top_k 1 is greedy decoding: each token the argmax given the ones before
        torch.testing.assert_close(net(greedy, cond).argmax(dim=-1), greedy, atol=0, rtol=0)


# --- end to end: a tokenizer run, then an ar run on its tokens ------------------------------------

import yaml  # noqa: E402

from tests.test_train import (COLOURS, assert_resume_after_sigkill_is_bit_identical,  # noqa: E402
                              assert_two_processes_match_one, final_weights, run, vgen_train_cmd, write_config)
from tests.train_fixtures import colour_dataset, tiny_text_encoder  # noqa: E402
from vgen.errors import ConfigError  # noqa: E402

TOKENIZER = ["kind=vae", "vae.image_size=16", "vae.autoencoder.width=16", "vae.autoencoder.multipliers=[1, 2, 2]",
             "vae.autoencoder.groups=4", "vae.autoencoder.quantizer=fsq", "vae.autoencoder.levels=[5, 5, 5]",
             "vae.autoencoder.z_channels=3", "train.batch_size=16", "train.precision=fp32", "optim.lr=3e-3",
             "optim.warmup_steps=10", "ema.decay=0.9", "train.steps=150", "train.checkpoint_every=150",
             "train.val_every=1000", "train.sample_every=1000", "train.val_images=16"]
TINY_AR = ["kind=ar", "ar.network.width=32", "ar.network.depth=2", "ar.network.heads=2",
           "ar.sample_prompts=[red, blue]", "ar.sample_seeds=2", "train.batch_size=16", "train.log_every=5",
           "train.val_images=16", "train.precision=fp32", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar-assets")
    data = colour_dataset(root)
    tokenizer = root / "tokenizer"
    result = run(vgen_train_cmd(write_config(root / "tok.yaml", TOKENIZER), data, tokenizer))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "text": tiny_text_encoder(root), "tokenizer": tokenizer, "root": root}


def ar_sets(assets, steps: int, checkpoint_every: int | None = None, every: int = 100000) -> list[str]:
    return [*TINY_AR, f"codec=run:{assets['tokenizer']}", f"text_encoder.source=local-dir:{assets['text']}",
            f"train.steps={steps}", f"train.checkpoint_every={checkpoint_every or steps}",
            f"train.val_every={every}", f"train.sample_every={every}"]


@pytest.mark.slow
def test_ar_learns_colour_names_and_generates_them(assets, tmp_path, monkeypatch, vgen_cli):
    """A colour name -> the tokens of a square of that colour, written one by one and decoded."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    sets = [*ar_sets(assets, 300, every=150), "optim.lr=2e-3", "ema.decay=0.99"]
    result = run(vgen_train_cmd(write_config(tmp_path / "c.yaml", sets), assets["data"], out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoding the train images" in result.stderr  # tokenized once, then read from the cache
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss_ema"] for r in rows if "val_loss_ema" in r]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses  # (3 val images: their loss says little here)
    assert len(val) == 2 and all(v == v for v in val)
    manifest = yaml.safe_load((out / "run.yaml").read_text())
    assert manifest["codec"]["codebook_size"] == 125 and manifest["export"]["tokens"] == [4, 4]
    assert (out / "samples" / "step-00000300.png").is_file()

    names = list(COLOURS)
    # the likeliest tokens (top-k 1: greedy decoding) draw the named colour
    made = vgen_cli("generate", *names, "--run", out, "-o", tmp_path / "greedy", "--top-k", "1", "--json")
    assert made.exit_code == 0, made.stderr
    generation = yaml.safe_load((tmp_path / "greedy" / "generation.yaml").read_text())
    assert generation["settings"]["top_k"] == 1 and generation["settings"]["temperature"] == 1.0
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    right = 0
    for row in generation["images"]:
        pixels = np.asarray(Image.open(tmp_path / "greedy" / row["file"]), dtype=np.float32)
        centre = pixels[6:10, 6:10].reshape(-1, 3).mean(0)
        right += names[int(np.linalg.norm(palette - centre, axis=1).argmin())] == row["prompt"]
    assert right >= len(names) - 1, right
    # sampled tokens (top-k 5) depend on each image's seed alone: one at a time gives the same pixels
    pixels = {}
    for batch in ("16", "1"):
        made = vgen_cli("generate", *names, "--run", out, "-o", tmp_path / f"gen{batch}", "--top-k", "5", "-n", "2",
                        "--batch-size", batch)
        assert made.exit_code == 0, made.stderr
        pixels[batch] = [Image.open(f).tobytes() for f in sorted((tmp_path / f"gen{batch}").glob("*.png"))]
    assert len(pixels["1"]) == 12 and pixels["1"] == pixels["16"]
    assert len(set(pixels["16"])) > 6  # and the seeds differ


@pytest.mark.slow
def test_ar_refuses_what_its_sampler_does_not_take_and_flow_refuses_token_options(assets, tmp_path, monkeypatch,
                                                                                 vgen_cli):
    from tests.test_train import flow_sets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert run(vgen_train_cmd(write_config(tmp_path / "c.yaml", ar_sets(assets, 2)), assets["data"], out)).returncode == 0
    for flags, named in ((["--steps", "4"], "--steps"), (["--sampler", "heun"], "--sampler"),
                         (["--init-image", str(tmp_path / "x.png"), "--strength", "0.5"], "--init-image")):
        result = vgen_cli("generate", "red", "--run", out, "-o", tmp_path / "g", *flags)
        assert result.exit_code == 2 and named in result.stderr and " ar run" in result.stderr, result.stderr
    for flags, message in ((["--temperature", "0"], "--temperature: expected a finite value > 0"),
                           (["--top-p", "1.5"], "--top-p: expected a value in (0, 1]")):
        result = vgen_cli("generate", "red", "--run", out, "-o", tmp_path / "g", *flags)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    flow = tmp_path / "flow"
    flow_cfg = write_config(tmp_path / "f.yaml", flow_sets(assets, 1))
    assert run(vgen_train_cmd(flow_cfg, assets["data"], flow)).returncode == 0
    result = vgen_cli("generate", "red", "--run", flow, "-o", tmp_path / "g", "--top-k", "3")
    assert result.exit_code == 2 and "--top-k" in result.stderr and "flow" in result.stderr, result.stderr


@pytest.mark.slow
def test_ar_needs_a_discrete_tokenizer(assets, tmp_path):
    from tests.test_codecs import TINY_VAE
    from vgen.families import build_family
    from vgen.families.config import train_config_from_dict

    vae = tmp_path / "vae"
    assert run(vgen_train_cmd(write_config(tmp_path / "v.yaml", TINY_VAE), assets["data"], vae)).returncode == 0
    text = f"local-dir:{assets['text']}"
    for codec, message in (("pixels", "expected 'run:TOKENIZER_RUN'"), (f"run:{vae}", "continuous latent")):
        cfg = train_config_from_dict({"kind": "ar", "codec": codec, "text_encoder": {"source": text}})
        with pytest.raises(ConfigError, match=message):
            build_family(cfg, 16, torch.device("cpu"))


@pytest.mark.slow
def test_ar_resume_after_sigkill_is_bit_identical(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = write_config(tmp_path / "c.yaml", ar_sets(assets, 24, checkpoint_every=4, every=12))
    killed = assert_resume_after_sigkill_is_bit_identical(config, assets["data"], tmp_path)
    assert any(k.startswith("network.blocks.") for k in final_weights(killed, "ema"))


@pytest.mark.slow
def test_ar_torchrun_two_processes_match_one(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = write_config(tmp_path / "c.yaml", ar_sets(assets, 6))
    assert_two_processes_match_one(config, assets["data"], tmp_path)
