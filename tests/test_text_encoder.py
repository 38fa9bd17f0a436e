"""The open_clip text encoder: every weights source, the features, and frozen / LoRA / full modes.

All offline: tiny architectures are registered in open_clip's registries for the length of a test,
their weights written by the tests themselves, and a tripwire makes any network access fail.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip import factory
from safetensors.torch import save_file

from vgen.errors import ManifestError, MissingDependencyError, UsageError
from vgen.manifest import sha256_file, write_manifest
from vgen.text.encoder import TextEncoder, TextFeatures, load_text_encoder
from vgen.lora import add_lora, lora_state_dict, merge_lora
from vgen.text.sources import TextEncoderConfig, load_open_clip, save_open_clip_local_dir

TINY = "vgen-test-tiny"
TAG = "vgen_test"
REPO = "vgen-test/tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CAPTIONS = ["a cat and a dog", "two fish!", "an apple to the left of a car", "a cat and a dog", "red"]


def tiny_model_cfg(width: int = 32, custom_text: bool = False) -> dict:
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }
    if custom_text:
        cfg["custom_text"] = True
    return cfg


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any name lookup or connection attempt fails (as OSError, like a machine without network)."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror("network access is disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return attempts


@pytest.fixture
def tiny_arch(monkeypatch) -> str:
    """Register TINY as an open_clip architecture (monkeypatch undoes it after the test)."""
    monkeypatch.setitem(factory._MODEL_CONFIGS, TINY, tiny_model_cfg())
    return TINY


def make_model(arch: str = TINY, seed: int = 1):
    torch.manual_seed(seed)
    return open_clip.create_model(arch).eval()


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --- sources -----------------------------------------------------------------------------------


def test_random_source_is_seeded_and_leaves_the_global_rng_alone(tiny_arch):
    before = torch.get_rng_state()
    a = load_open_clip(TextEncoderConfig(arch=tiny_arch, source="random"))
    b = load_open_clip(TextEncoderConfig(arch=tiny_arch, source="random"))
    assert torch.equal(before, torch.get_rng_state())
    assert_same_weights(a.model, b.model)
    assert a.id == f"{tiny_arch}/random" and a.weights_sha256 is None
    assert not a.model.training


def test_safetensors_file_source(tiny_arch, tmp_path):
    model = make_model()
    path = tmp_path / "weights.safetensors"
    save_file(state_of(model), path)
    loaded = load_open_clip(TextEncoderConfig(arch=tiny_arch, source=str(path)))
    assert_same_weights(model, loaded.model)
    assert loaded.weights_sha256 == sha256_file(path)
    assert loaded.id == f"{tiny_arch}/file:{loaded.weights_sha256[:12]}"


def test_safetensors_file_errors(tiny_arch, tmp_path, monkeypatch):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UsageError, match="nope.safetensors: no such file"):
        load_open_clip(TextEncoderConfig(arch=tiny_arch, source=str(missing)))

    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(UsageError, match="only .safetensors"):
        load_open_clip(TextEncoderConfig(arch=tiny_arch, source=str(pickled)))

    # weights of a wider text tower for the tiny arch: the error names the expected arch
    monkeypatch.setitem(factory._MODEL_CONFIGS, "vgen-test-wide", tiny_model_cfg(width=64))
    path = tmp_path / "wide.safetensors"
    save_file(state_of(make_model("vgen-test-wide")), path)
    with pytest.raises(UsageError, match=f"not a full open_clip state dict for arch '{tiny_arch}'"):
        load_open_clip(TextEncoderConfig(arch=tiny_arch, source=str(path)))

    # a text-only state dict: missing keys are named
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state_of(make_model()).items() if not k.startswith("visual.")}, partial)
    with pytest.raises(UsageError, match=r"missing keys \(e.g. visual\."):
        load_open_clip(TextEncoderConfig(arch=tiny_arch, source=str(partial)))


def test_local_dir_round_trips_through_open_clip(tiny_arch, tmp_path):
    model = make_model()
    out = tmp_path / "export"
    save_open_clip_local_dir(model, tiny_model_cfg(), out)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert_same_weights(model, open_clip.create_model(f"local-dir:{out}"))  # open_clip's own loader

    loaded = load_open_clip(TextEncoderConfig(arch="ignored-for-local-dir", source=f"local-dir:{out}"))
    assert_same_weights(model, loaded.model)
    assert loaded.weights_sha256 == sha256_file(out / "open_clip_model.safetensors")
    assert loaded.id == f"local-dir:{loaded.weights_sha256[:12]}"
    assert loaded.model_cfg == tiny_model_cfg()

    # saving again replaces the directory as a whole
    other = make_model(seed=2)
    save_open_clip_local_dir(other, tiny_model_cfg(), out)
    assert_same_weights(other, load_open_clip(TextEncoderConfig(source=f"local-dir:{out}")).model)


def test_local_dir_errors(tmp_path):
    with pytest.raises(UsageError, match="no such directory"):
        load_open_clip(TextEncoderConfig(source=f"local-dir:{tmp_path / 'missing'}"))
    with pytest.raises(UsageError, match="open_clip_config.json: missing"):
        load_open_clip(TextEncoderConfig(source=f"local-dir:{tmp_path}"))
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {}}')
    with pytest.raises(UsageError, match="no weights file"):
        load_open_clip(TextEncoderConfig(source=f"local-dir:{tmp_path}"))


def test_save_refuses_an_unmerged_lora_model(tiny_arch, tmp_path):
    model = make_model()
    add_lora(model.transformer, rank=2, alpha=2.0)
    with pytest.raises(Exception, match="merge"):
        save_open_clip_local_dir(model, tiny_model_cfg(), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_run_source_loads_the_exported_local_dir(tiny_arch, tmp_path):
    model = make_model()
    run = tmp_path / "run"
    save_open_clip_local_dir(model, tiny_model_cfg(), run / "export" / "open_clip")
    export = {"format": "open_clip-local-dir", "path": "export/open_clip"}
    write_manifest(run / "run.yaml", "run", {"export": export})
    loaded = load_open_clip(TextEncoderConfig(source=f"run:{run}"))
    assert_same_weights(model, loaded.model)
    # the same weights get the same id however they are named, so embedding caches are shared
    assert loaded.id == load_open_clip(TextEncoderConfig(source=f"local-dir:{run / 'export/open_clip'}")).id

    write_manifest(run / "run.yaml", "run", {"export": {"format": "flow-safetensors", "path": "export"}})
    with pytest.raises(ManifestError, match="needs a CLIP run"):
        load_open_clip(TextEncoderConfig(source=f"run:{run}"))
    with pytest.raises(ManifestError, match="no such file"):
        load_open_clip(TextEncoderConfig(source=f"run:{tmp_path / 'elsewhere'}"))


# --- pretrained tags ---------------------------------------------------------------------------


@pytest.fixture
def tiny_tag(tiny_arch, monkeypatch) -> str:
    """Register TAG for TINY in open_clip's pretrained registry, pointing at the fake hub repo REPO."""
    registry = open_clip.pretrained._PRETRAINED
    monkeypatch.setitem(registry, tiny_arch, {TAG: open_clip.pretrained._pcfg(hf_hub=f"{REPO}/")})
    return TAG


def populate_hf_cache(cache: Path, model) -> Path:
    """huggingface_hub's cache layout: models--ORG--REPO/{refs/main, snapshots/COMMIT/FILE}."""
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    path = snapshot / "open_clip_model.safetensors"
    save_file(state_of(model), path)
    return path


def test_pretrained_tag_loads_from_a_prepopulated_hf_cache(tiny_tag, tmp_path, monkeypatch, no_network):
    model = make_model()
    cache = tmp_path / "hub"
    weights = populate_hf_cache(cache, model)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = load_open_clip(TextEncoderConfig(arch=TINY, source=tiny_tag))
    assert_same_weights(model, loaded.model)
    assert loaded.id == f"{TINY}/{TAG}"
    assert loaded.weights_sha256 == sha256_file(weights)

    # not offline-flagged and no env var: `cache_dir` alone finds it, still without a network call
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    loaded = load_open_clip(TextEncoderConfig(arch=TINY, source=tiny_tag.upper(), cache_dir=str(cache)))
    assert_same_weights(model, loaded.model)
    assert loaded.id == f"{TINY}/{TAG}"
    assert no_network == []


def test_uncached_tag_offline_fails_fast_with_how_to(tiny_tag, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(MissingDependencyError) as info:
        load_open_clip(TextEncoderConfig(arch=TINY, source=tiny_tag))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "offline" in message and str(tmp_path / "empty-cache") in message
    assert f"open_clip.create_model('{TINY}', pretrained='{TAG}')" in message
    assert "local-dir:" in message and ".safetensors" in message
    assert no_network == []  # HF_HUB_OFFLINE=1: not even the reachability probe


def test_uncached_tag_with_unreachable_hub_fails_fast(tiny_tag, tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(MissingDependencyError, match="offline"):
        load_open_clip(TextEncoderConfig(arch=TINY, source=tiny_tag))
    assert time.monotonic() - start < 5
    assert len(no_network) == 1  # one probe, refused by the tripwire: nothing was downloaded


def test_unknown_tag_and_arch_suggest_the_closest():
    with pytest.raises(UsageError) as info:
        load_open_clip(TextEncoderConfig(arch="ViT-B-32", source="laion2b_s34b_b79"))
    assert "Pretrained tags for 'ViT-B-32': laion2b_s34b_b79k," in str(info.value)

    with pytest.raises(UsageError) as info:
        load_open_clip(TextEncoderConfig(arch="ViT-B-33", source="random"))
    assert "unknown open_clip architecture 'ViT-B-33'. Known: ViT-B-32" in str(info.value)


def test_arch_without_tags_says_so(tiny_arch):
    with pytest.raises(UsageError, match="has no pretrained tags"):
        load_open_clip(TextEncoderConfig(arch=tiny_arch, source="openai"))


# --- features ----------------------------------------------------------------------------------


@pytest.mark.parametrize("custom_text", [False, True], ids=["CLIP", "CustomTextCLIP"])
def test_pooled_equals_open_clip_encode_text(monkeypatch, custom_text):
    monkeypatch.setitem(factory._MODEL_CONFIGS, TINY, tiny_model_cfg(custom_text=custom_text))
    loaded = load_open_clip(TextEncoderConfig(arch=TINY, source="random"))
    model = loaded.model
    assert isinstance(model, open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)
    encoder = TextEncoder(loaded)
    assert not any(name.startswith("visual") for name, _ in encoder.named_parameters())
    assert (encoder.width, encoder.embed_dim, encoder.context_length) == (32, 24, 16)

    tokens = encoder.tokenize(CAPTIONS)
    assert torch.equal(tokens, open_clip.get_tokenizer(TINY)(CAPTIONS))
    features = encoder(tokens)
    assert isinstance(features, TextFeatures)
    assert features.tokens.shape == (len(CAPTIONS), 16, 32)
    assert features.pooled.shape == (len(CAPTIONS), 24)
    with torch.no_grad():
        expected = model.encode_text(tokens)
    torch.testing.assert_close(features.pooled, expected, atol=1e-6, rtol=0)
    # The tower's input, for the generator's lexical path: token + positional embeddings.
    embeddings = encoder.token_embedding(tokens) + encoder.positional_embedding[: tokens.shape[1]]
    torch.testing.assert_close(features.embeddings, embeddings, atol=0, rtol=0)
    assert torch.equal(encoder.encode(CAPTIONS).embeddings, features.embeddings.detach())  # and the cache


def test_mask_marks_start_caption_and_end_tokens(tiny_arch):
    encoder = load_text_encoder(TextEncoderConfig(arch=tiny_arch, source="random"))
    captions = ["two fish!", "", " ".join(["cat"] * 40)]  # the last one is truncated to 16 positions
    tokens = encoder.tokenize(captions)
    mask = encoder.encode(captions).mask
    assert mask.dtype == torch.bool
    lengths = [len(encoder.tokenizer.encode(c)) + 2 for c in captions[:2]] + [16]
    assert mask.sum(dim=1).tolist() == lengths
    for row, n in zip(range(3), lengths):
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (tokens[row, n:] == 0).all() and tokens[row, n - 1] == encoder.tokenizer.eot_token_id


# --- modes -------------------------------------------------------------------------------------


def test_frozen_cache_matches_single_and_batched_encoding(tiny_arch):
    cfg = TextEncoderConfig(arch=tiny_arch, source="random")
    encoder = load_text_encoder(cfg)
    assert encoder.trainable_parameters() == []
    encoder.train()
    assert not encoder.training  # a frozen encoder stays in eval mode

    cached = encoder.encode(CAPTIONS)
    assert not cached.pooled.requires_grad
    assert len(encoder._cache) == len(set(CAPTIONS))
    again = encoder.encode(list(reversed(CAPTIONS)))
    for i, j in zip(range(len(CAPTIONS)), reversed(range(len(CAPTIONS)))):
        assert torch.equal(cached.tokens[i], again.tokens[j])

    fresh = load_text_encoder(cfg)
    with torch.no_grad():
        for i, caption in enumerate(CAPTIONS):  # bitwise what a batch of one gives, uncached
            single = fresh(fresh.tokenize([caption]))
            for got, want in zip(cached, single):
                assert torch.equal(got[i], want[0])
        batched = fresh(fresh.tokenize(CAPTIONS))
    torch.testing.assert_close(cached.tokens, batched.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.pooled, batched.pooled, atol=1e-5, rtol=0)
    assert torch.equal(cached.mask, batched.mask)

    # a caption first seen under bf16 autocast is cached exactly as without it
    autocast_encoder = load_text_encoder(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = autocast_encoder.encode(CAPTIONS)
    assert under_autocast.tokens.dtype == torch.float32
    assert torch.equal(under_autocast.tokens, cached.tokens)
    assert torch.equal(under_autocast.pooled, cached.pooled)


def test_frozen_cache_is_bounded(tiny_arch):
    encoder = load_text_encoder(TextEncoderConfig(arch=tiny_arch, source="random"), cache_limit=2)
    reference = load_text_encoder(TextEncoderConfig(arch=tiny_arch, source="random"), cache_limit=100)
    for start in range(len(CAPTIONS)):
        batch = CAPTIONS[start:] + CAPTIONS[:start]
        got = encoder.encode(batch)
        assert len(encoder._cache) <= 2
        assert torch.equal(got.pooled, reference.encode(batch).pooled)


def test_lora_trains_only_its_factors_and_merges(tiny_arch):
    cfg = TextEncoderConfig(arch=tiny_arch, source="random")
    frozen = load_text_encoder(cfg)
    torch.manual_seed(0)
    encoder = load_text_encoder(TextEncoderConfig(arch=tiny_arch, source="random", mode="lora", lora_rank=4))
    tokens = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        start, base = encoder(tokens), frozen(tokens)
    assert torch.equal(start.pooled, base.pooled) and torch.equal(start.tokens, base.tokens)  # B = 0

    trainable = dict((n, p) for n, p in encoder.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == encoder.lora_parameter_count
    # 2 layers x (in_proj 96x32, out_proj 32x32, c_fc 128x32, c_proj 32x128), rank 4: r*(in+out) each
    assert encoder.lora_parameter_count == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert set(lora_state_dict(encoder)) == set(trainable)

    base_weights = {n: p.detach().clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(encoder.trainable_parameters(), lr=1e-2)
    encoder.train()
    for _ in range(3):
        loss = encoder.encode(CAPTIONS).pooled.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        trained = encoder(tokens)
    assert (trained.pooled - base.pooled).abs().max() > 1e-4
    for name, p in encoder.named_parameters():
        if name in base_weights:
            assert torch.equal(p, base_weights[name]), name

    merged = merge_lora(encoder)
    assert merged == 2 * 4 and lora_state_dict(encoder) == {}
    assert encoder.trainable_parameters() == []
    with torch.no_grad():
        after = encoder(tokens)
    torch.testing.assert_close(after.pooled, trained.pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.tokens, trained.tokens, atol=1e-5, rtol=0)
    assert set(encoder.state_dict()) == set(frozen.state_dict())  # plain open_clip names again


def test_lora_adapts_linear_and_multihead_attention_weights():
    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(8, 2, batch_first=True)})
    x = torch.randn(2, 3, 8)
    before = module["attn"](x, x, x, need_weights=False)[0]
    n = add_lora(module, rank=2, alpha=4.0, targets=("attn.in_proj_weight", "attn.out_proj.weight"))
    assert n == 2 * (8 + 24) + 2 * (8 + 8)
    assert torch.equal(module["attn"](x, x, x, need_weights=False)[0], before)
    with pytest.raises(ValueError, match="no 2-D parameter"):
        add_lora(torch.nn.Linear(2, 2), rank=1, alpha=1.0, targets=("c_fc.weight",))


def test_full_mode_trains_the_whole_text_tower(tiny_arch):
    encoder = load_text_encoder(TextEncoderConfig(arch=tiny_arch, source="random", mode="full"))
    assert len(encoder.trainable_parameters()) == len(list(encoder.parameters()))
    encoder.train()
    assert encoder.training
    encoder.encode(CAPTIONS[:2]).pooled.sum().backward()
    grad = encoder.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert encoder._cache == {}  # only a frozen encoder caches


def test_config_validation(tiny_arch):
    with pytest.raises(ValueError, match="lora_rank"):
        TextEncoderConfig(lora_rank=0)
    loaded = load_open_clip(TextEncoderConfig(arch=tiny_arch, source="random"))
    with pytest.raises(UsageError, match="text_encoder.mode"):
        TextEncoder(loaded, mode="partial")
