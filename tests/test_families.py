"""The family and network seams: the registries, the layering, the UNet and the GAN family (which
must learn, resume bit for bit, match under torchrun, and refuse sampler flags it does not take)."""

from __future__ import annotations

import ast
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from tests.test_train import (COLOURS, REPO, assert_resume_after_sigkill_is_bit_identical, assert_two_processes_match_one,
                              final_weights, flow_sets, run, vgen_train_cmd, write_config)
from tests.train_fixtures import colour_dataset, tiny_text_encoder
from vgen.errors import ConfigError
from vgen.families.config import train_config_from_dict

TINY_GAN = [
    "kind=gan", "gan.image_size=16", "gan.generator.z_dim=16", "gan.generator.width=32", "gan.generator.heads=2",
    "gan.discriminator.width=16", "gan.sample_prompts=[red, blue]", "gan.sample_seeds=2", "gan.r1_every=4",
    "train.batch_size=16", "train.log_every=5", "train.val_images=16", "train.precision=fp32",
    "optim.warmup_steps=0", "optim.betas=[0.0, 0.99]", "ema.decay=0.9",
]

# Optional matching terms, off in configs/gan-tiny-cpu.yaml (bench/RESULTS.md): contrastive, in
# groups of 8 here, hard wrong captions, position-aware queries in G.
CONTRASTIVE = ["gan.contrastive_weight=1.0", "gan.contrastive_group=8", "gan.mismatch_hard=0.5",
               "gan.generator.position_queries=true"]
# On in the config: feature matching (G matches D's feature map of the real image of its caption).
FEATURE_MATCHING = ["gan.feature_matching_weight=4.0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("families-assets")
    return {"data": colour_dataset(root), "text": tiny_text_encoder(root), "root": root}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Only the tiny CLIP (for the unit tests, which need no dataset)."""
    return tiny_text_encoder(tmp_path_factory.mktemp("families-clip"))


def gan_sets(assets, steps: int, checkpoint_every: int | None = None, every: int = 100000) -> list[str]:
    return [*TINY_GAN, f"text_encoder.source=local-dir:{assets['text']}", f"train.steps={steps}",
            f"train.checkpoint_every={checkpoint_every or steps}", f"train.val_every={every}",
            f"train.sample_every={every}"]


# --- registries and layering ---------------------------------------------------------------------


def test_unknown_kind_and_network_name_the_known_ones():
    with pytest.raises(ConfigError, match="'flow', 'gan', 'vae', 'ar', 'clip'") as e:
        train_config_from_dict({"kind": "diffusion"}, overrides=["kind=gpt"])
    assert "--set kind=gpt" in str(e.value)
    with pytest.raises(ConfigError, match="flow.network.type: expected one of 'dit', 'unet'"):
        train_config_from_dict({"flow": {"network": {"type": "mlp"}}})
    unet = train_config_from_dict({"flow": {"network": {"type": "unet", "width": 32}}})
    assert type(unet.flow.network).__name__ == "UNetConfig" and unet.flow.network.width == 32
    # A section of another family is not this family's key.
    with pytest.raises(ConfigError, match="unknown key 'gan'"):
        train_config_from_dict({"kind": "flow", "gan": {}})


def test_a_family_brings_its_optimiser_defaults():
    """A GAN config without `optim:` gets the GAN's Adam (beta1 0, no warm-up) for G, as D does,
    not the flow family's; a key given keeps the family's defaults for the rest."""
    gan = train_config_from_dict({"kind": "gan", "optim": {"lr": 1e-3}})
    assert gan.optim.lr == 1e-3 and gan.optim.betas == (0.0, 0.99) and gan.optim.warmup_steps == 0
    assert gan.gan.d_optim.betas == (0.0, 0.99)
    flow = train_config_from_dict({"kind": "flow"})
    assert flow.optim.betas == (0.9, 0.99) and flow.optim.warmup_steps == 100


def test_old_run_configs_still_read_back():
    """A run.yaml of vgen before the family seam recorded every kind's section and no network type."""
    from vgen.families.config import recorded_train_config

    old = {"kind": "flow", "text_encoder": {"source": "random"}, "flow": {"network": {"width": 64, "heads": 2}},
           "clip": {"embed_dim": 128}, "optim": {}, "ema": {}, "train": {}}
    cfg = recorded_train_config(old, "run.yaml")
    assert cfg.flow.network.type == "dit" and cfg.flow.network.width == 64 and not hasattr(cfg, "clip")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_dependencies_run_one_way():
    """cli -> stages -> families -> models/diffusion -> base: training never imports generation
    (runs, generate, evaluate), generation never imports training, families and models neither."""
    root = REPO / "vgen"
    stages = ("vgen.generate", "vgen.runs", "vgen.evaluate")
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        imported = _imports(path)
        if module.startswith(("vgen.train", "vgen.families", "vgen.models", "vgen.diffusion")):
            bad = [name for name in imported if name.startswith(stages)]
            assert not bad, f"{module} imports {bad}"
        if module.startswith(("vgen.generate", "vgen.runs", "vgen.evaluate", "vgen.families", "vgen.models")):
            bad = [name for name in imported if name.startswith("vgen.train")]
            assert not bad, f"{module} imports {bad}"
        if module.startswith(("vgen.models", "vgen.diffusion")):
            bad = [name for name in imported if name.startswith("vgen.families")]
            assert not bad, f"{module} imports {bad}"


# --- networks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, settings", [("dit", {"patch_size": 4, "width": 32, "depth": 1, "heads": 2}),
                                             ("unet", {"width": 16, "heads": 2}),
                                             ("unet", {"width": 16, "heads": 2, "patch_size": 2})])
def test_networks_share_one_signature_and_start_at_zero(kind, settings):
    from vgen.models import NETWORK_CONFIGS, build_network
    from vgen.text.encoder import TextFeatures

    cfg = NETWORK_CONFIGS[kind](image_size=16, **settings)
    torch.manual_seed(0)
    net = build_network(cfg, 24, 12)
    text = TextFeatures(torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 12),
                        torch.randn(2, 5, 24))
    x = torch.randn(2, 3, 16, 16)
    v = net(x, torch.rand(2), text)
    assert v.shape == x.shape and v.abs().max() == 0  # zero-initialised output: the untrained v is 0
    v.sum().backward()  # and every block is reachable by the gradient
    assert net.out.weight.grad.abs().sum() > 0


def test_unet_patches_fold_pixels_into_channels():
    from vgen.models.unet import UNet, UNetConfig
    from vgen.text.encoder import TextFeatures

    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=16, patch_size=2, width=16, heads=2, multipliers=[1, 2],
                          attention_levels=[1]), 24, 12)
    assert net.inp.in_channels == 12 and net.out.out_channels == 12  # 3 channels x 2 x 2 pixels
    shapes = []
    net.down[0]["res"].register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    text = TextFeatures(torch.randn(1, 5, 24), torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 12),
                        torch.randn(1, 5, 24))
    x = torch.randn(1, 3, 16, 16)
    assert net(x, torch.rand(1), text).shape == x.shape
    assert shapes == [(1, 16, 8, 8)]  # the first level runs at 16 / 2 px
    with pytest.raises(ValueError, match="not a multiple of patch_size 3"):
        UNetConfig(image_size=16, patch_size=3)
    with pytest.raises(ValueError, match="= 4 cannot be halved 3 times"):
        UNetConfig(image_size=16, patch_size=4, multipliers=[1, 1, 1, 1])


@pytest.mark.slow
def test_flow_trains_a_unet_with_no_other_change(assets, tmp_path):
    sets = [*(s for s in flow_sets(assets, 60) if not s.startswith("flow.network.")), "flow.network.type=unet",
            "flow.network.image_size=16", "flow.network.width=16", "flow.network.heads=2",
            "flow.network.multipliers=[1, 2]", "flow.network.attention_levels=[1]", "optim.lr=2e-3"]
    out = tmp_path / "run"
    result = run(vgen_train_cmd(write_config(tmp_path / "c.yaml", sets), assets["data"], out))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in map(yaml.safe_load, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses[-1] < 0.6 * losses[0], losses
    assert any(k.startswith("network.down.") for k in final_weights(out, "ema"))


# --- the GAN family ------------------------------------------------------------------------------


def test_in_fixed_batches_calls_one_batch_shape_and_keeps_the_order():
    from vgen.families.base import in_fixed_batches

    seen = []

    def double(rows):
        seen.append(rows.tolist())
        return torch.arange(10.0)[rows] * 2

    out = in_fixed_batches(double, 10, size=4)
    assert out.tolist() == [2.0 * i for i in range(10)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]  # the last padded with its last row
    assert in_fixed_batches(double, 1, size=4).tolist() == [0.0]


def test_diff_augment_known_answers():
    from vgen.families.gan_terms import diff_augment

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) / 400 - 0.5
    neutral = torch.full((2, 7), 0.5)
    torch.testing.assert_close(diff_augment(x, neutral, ["color"]), x)  # brightness 0, saturation 1, contrast 1
    # translation: u = 0 shifts by -1 (the most up/left), zero-filled at the bottom/right edge
    params = neutral.clone()
    params[:, 3], params[:, 4] = 0.0, 0.999
    shifted = diff_augment(x, params, ["translation"])
    torch.testing.assert_close(shifted[:, :, :-1, 1:], x[:, :, 1:, :-1])
    assert shifted[:, :, -1].abs().sum() == 0 and shifted[:, :, :, 0].abs().sum() == 0
    # cutout: a 4x4 (half-size) square of zeros around the chosen centre
    params = neutral.clone()
    params[:, 5], params[:, 6] = 0.5, 0.5  # centre (4, 4): rows and columns 2..5, half the size
    cut = diff_augment(x + 10, params, ["cutout"])
    assert (cut[:, :, 2:6, 2:6] == 0).all() and (cut == 0).sum() == 2 * 3 * 16
    x.requires_grad_(True)
    diff_augment(x, torch.rand(2, 7), ["color", "translation", "cutout"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_feature_discriminator_is_frozen_and_reads_the_caption(tiny_clip):
    """backbone: clip: the CLIP image tower is D's frozen feature network (no trainable parameter,
    eval mode in training), its heads train, the image gets a gradient, and the caption changes
    the logit."""
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "gan": {"image_size": 16, "discriminator": {"backbone": "clip", "head_width": 16,
                                                                              "clip_blocks": [0]}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    d = family.model.d
    assert type(d).__name__ == "ClipFeatureDiscriminator"
    # The frozen tower is outside the module tree: not trained, not in D's weights.
    assert all(p.requires_grad for p in d.parameters()) and not any(k.startswith("visual.") for k in d.state_dict())
    assert all(not p.requires_grad for p in d.visual.parameters())
    d.train()
    assert d.training and not d.visual.training
    for p in d.parameters():  # heads start at random; make the projection term matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    text = family.model.g.encode_text(["red", "blue"])
    logits = d(images * 2 - 1, text)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert images.grad.abs().sum() > 0
    swapped = d(images * 2 - 1, family.model.g.encode_text(["blue", "red"]))
    assert not torch.allclose(logits, swapped)
    bad = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "gan": {"image_size": 16, "discriminator": {"backbone": "clip", "clip_blocks": [7]}}})
    with pytest.raises(ConfigError, match=r"clip_blocks: \[7\] must be distinct, increasing block indices in 0\.\.0"):
        build_family(bad, 16, torch.device("cpu"))
    with pytest.raises(ConfigError, match="clip_blocks is for backbone clip"):
        train_config_from_dict({"kind": "gan", "gan": {"discriminator": {"clip_blocks": [0]}}})


def test_gan_matching_options_are_checked_before_training(tiny_clip, monkeypatch):
    """The contrastive groups must divide each process's share of the batch (under torchrun too),
    and position-aware queries need channels a sine-cosine embedding can fill."""
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "train": {"batch_size": 32},
                                  "gan": {"image_size": 16, "contrastive_weight": 1.0, "contrastive_group": 16}})
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="does not divide the batch of 8 each of 4 process"):
        build_family(cfg, 16, torch.device("cpu"))
    with pytest.raises(ConfigError, match="width 66 gives 66"):
        train_config_from_dict({"kind": "gan", "gan": {"generator": {"width": 66, "position_queries": True}}})


def test_conv_discriminator_reads_checkpoints_from_before_text_projection(tiny_clip):
    """The conv D's text layers moved under `projection.`; a state dict with the old names loads."""
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "gan": {"image_size": 16, "discriminator": {"width": 8}}})
    d = build_family(cfg, 16, torch.device("cpu")).model.d
    new = {k: v.clone() for k, v in d.state_dict().items()}
    old = {k.removeprefix("projection."): v.clone() + 1 for k, v in new.items()}
    assert any(k.startswith("token_pool.") for k in old)
    d.load_state_dict(old)
    assert all(torch.equal(d.state_dict()[k], v + 1) for k, v in new.items())


def test_pairwise_scores_are_the_projection_term_of_every_caption():
    """Discriminator(..., pairs=P): scores[i, j] is the conditional part of the logit image i would
    get with caption j, computed for all pairs at once."""
    from vgen.models.gan import Discriminator, DiscriminatorConfig
    from vgen.text.encoder import TextFeatures

    torch.manual_seed(0)
    for lexical in (False, True):
        d = Discriminator(DiscriminatorConfig(width=8, text_lexical=lexical), 16, 3, 12, 10)
        for p in d.parameters():
            torch.nn.init.normal_(p, std=0.3)
        mask = torch.ones(5, 6, dtype=torch.bool)
        mask[:, 4:], mask[0, 2:] = False, False
        text = TextFeatures(torch.randn(5, 6, 12), mask, torch.randn(5, 10), torch.randn(5, 6, 12))
        images = torch.randn(5, 3, 16, 16)
        logits, scores = d(images, text, pairs=4)
        assert scores.shape == (4, 4) and torch.equal(logits, d(images, text))
        unconditional = d.unconditional(d.embed(images))[:, 0]
        for shift in range(4):  # caption j = (i + shift) % 4 for image i, through the plain forward
            order = [(i + shift) % 4 for i in range(4)] + [4]
            projection = d(images, TextFeatures(*(t[order] for t in text))) - unconditional
            assert torch.allclose(scores[torch.arange(4), torch.tensor(order[:4])], projection[:4], atol=1e-5)


def test_spatial_projection_asks_each_place_what_the_caption_puts_there():
    """discriminator.spatial_projection: logit += mean over the 4 x 4 places of <c(text, h_p + pos_p), h_p>;
    the same features at two places score differently, since their text queries carry the place."""
    from vgen.models.gan import Discriminator, DiscriminatorConfig
    from vgen.text.encoder import TextFeatures

    torch.manual_seed(0)
    d = Discriminator(DiscriminatorConfig(width=8, spatial_projection=True), 16, 3, 12, 10)
    for p in d.parameters():
        torch.nn.init.normal_(p, std=0.3)
    text = TextFeatures(torch.randn(2, 6, 12), torch.ones(2, 6, dtype=torch.bool), torch.randn(2, 10),
                        torch.randn(2, 6, 12))
    images = torch.randn(2, 3, 16, 16)
    grid = d.feature_map(images)
    h = d._embed(grid)
    c = d.projection(h[:, None], text)[:, 0]
    plain = d.unconditional(h)[:, 0] + (c * h).sum(dim=1) / h.shape[1] ** 0.5
    torch.testing.assert_close(d(images, text), plain + d._spatial_term(grid, text))
    places = grid.flatten(2).transpose(1, 2)
    one = torch.zeros_like(places)
    one[:, 0], moved = places[:, 5], torch.zeros_like(places)
    moved[:, 15] = places[:, 5]  # the same feature vector at another place
    term = [d._spatial_term(x.transpose(1, 2).reshape(grid.shape), text) for x in (one, moved)]
    assert not torch.allclose(term[0], term[1])
    assert any(k.startswith("spatial.") for k in d.state_dict())
    with pytest.raises(ConfigError, match="spatial_projection is a term of the conv backbone"):
        train_config_from_dict({"kind": "gan", "gan": {"discriminator": {"backbone": "clip", "spatial_projection": True}}})


def test_contrastive_loss_known_answers():
    """Cross-entropy of the own caption among the group's captions and wrong captions; a candidate
    with the image's own caption text is no negative; another group's columns do not count."""
    import math

    from vgen.families.gan_terms import contrastive_loss

    o = 50.0  # another group's column: it would dominate if it counted
    scores = torch.tensor([[2.0, 0.0, o, o, 0.0, 1.0, o, o],
                           [1.0, 3.0, o, o, 3.0, 0.0, o, o],
                           [o, o, 0.0, 1.0, o, o, 0.0, 0.0],
                           [o, o, 5.0, 5.0, o, o, 0.0, 0.0]])
    captions, wrong = ["a cat", "a dog", "a pig", "a cow"], ["a fox", "a cat", "a hen", "a owl"]
    loss, top1 = contrastive_loss(scores, captions, wrong, group=2)
    # Columns 4..7 are the wrong captions of samples 0..3. Row 0 leaves out column 5, the wrong
    # caption of sample 1, which is its own text "a cat"; for row 1 that column is a negative.
    candidates = [[2.0, 0.0, 0.0], [1.0, 3.0, 3.0, 0.0], [0.0, 1.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0]]
    own = [0, 1, 0, 1]
    expected = [math.log(sum(math.exp(v) for v in row)) - row[k] for row, k in zip(candidates, own)]
    assert math.isclose(loss.item(), sum(expected) / 4, rel_tol=1e-6)
    assert top1.item() == 0.5  # rows 0 and 1 (a tie goes to the first column, its own) right
    with pytest.raises(ConfigError, match="contrastive_group 3 does not divide the batch of 4"):
        contrastive_loss(scores, captions, wrong, group=3)
    with pytest.raises(ConfigError, match="contrastive_weight needs discriminator.backbone: conv"):
        train_config_from_dict({"kind": "gan", "gan": {"contrastive_weight": 1.0,
                                                       "discriminator": {"backbone": "conv+clip"}}})


def test_hard_wrong_captions_are_one_word_away(tiny_clip):
    """gan.mismatch_hard: that share of D's wrong captions differ from the true one in one word."""
    import random

    from vgen.families import build_family

    captions = [["a cat and a dog"], ["a cat and a fish"], ["a dog and a cat"], ["two cats"], ["a pig"]]
    dataset = type("Captions", (), {"captions": captions, "__len__": lambda self: len(captions)})()
    for share, expected in ((1.0, 1.0), (0.5, 0.5), (0.0, 0.0)):
        cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                      "gan": {"image_size": 16, "mismatch_hard": share,
                                              "discriminator": {"width": 8}}})
        family = build_family(cfg, 16, torch.device("cpu"))
        picks = [family._wrong_caption(dataset, 0, "a cat and a dog", random.Random(i)) for i in range(400)]
        assert all(caption != "a cat and a dog" for caption, _ in picks)
        hard = [caption for caption, is_hard in picks if is_hard]
        assert set(hard) <= {"a cat and a fish"}  # never the reordering, which says the same
        assert abs(len(hard) / len(picks) - expected) < 0.08


def test_r1_and_clip_guidance_through_the_clip_tower(tiny_clip):
    """backbone conv+clip: the R1 step differentiates twice through the CLIP tower's attention (the
    fused kernels cannot), and CLIP guidance adds its distance to G's loss."""
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "gan": {"image_size": 16, "r1_every": 1, "clip_guidance": 1.0,
                                          "generator": {"width": 32, "z_dim": 8},
                                          "discriminator": {"backbone": "conv+clip", "width": 8, "head_width": 8}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    torch.manual_seed(0)
    batch = {"real": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["red", "blue"], "wrong_captions": ["blue", "red"],
             "wrong_hard": torch.tensor([True, False]), "z": torch.randn(2, 8), "augment": torch.rand(2, 4, 7)}
    loss, logs = family.d_loss(family.model.d, batch, 0)
    loss.backward()
    assert logs["r1"] > 0 and all(p.grad is not None for p in family.model.d.parameters())
    assert logs["d_mismatch_hard"] in (0, 1)  # D's verdict on the one hard wrong caption
    # Guidance reaches G: its gradient differs from the adversarial term's alone.
    grads = []
    for weight in (0.0, 1.0):
        family.cfg.gan.clip_guidance = weight
        family.model.g.zero_grad()
        loss, logs = family.g_loss(family.model.g, batch, 0)
        loss.backward()
        grads.append(family.model.g.generator.to_rgb.weight.grad.clone())
    assert 0 < logs["clip_distance"] <= torch.pi ** 2 and not torch.allclose(grads[0], grads[1])
    with pytest.raises(ConfigError, match="clip_guidance needs discriminator.backbone"):
        train_config_from_dict({"kind": "gan", "gan": {"clip_guidance": 1.0}})


def test_reconstruction_term_known_answer(tiny_clip):
    """gan.reconstruction_weight adds w * mean |pool(G(z, caption)) - pool(x)| to G's loss, both
    average-pooled to reconstruction_size, and a size that does not divide the image is refused."""
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "gan": {"image_size": 16, "generator": {"width": 32, "z_dim": 8},
                                          "discriminator": {"width": 8}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    torch.manual_seed(0)
    batch = {"real": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["red", "blue"], "wrong_captions": ["blue", "red"],
             "wrong_hard": torch.tensor([False, False]), "z": torch.randn(2, 8), "augment": torch.rand(2, 4, 7)}
    with torch.no_grad():
        fake = family.model.g(batch["z"], batch["captions"])
        base, _ = family.g_loss(family.model.g, batch, 0)
        for size, pooled in ((0, lambda x: x), (4, lambda x: x.view(2, 3, 4, 4, 4, 4).mean(dim=(3, 5)))):
            family.cfg.gan.reconstruction_weight, family.cfg.gan.reconstruction_size = 3.0, size
            loss, logs = family.g_loss(family.model.g, batch, 0)
            expected = (pooled(fake) - pooled(batch["real"])).abs().mean()
            torch.testing.assert_close(logs["g_l1"], expected)
            torch.testing.assert_close(loss, base + 3.0 * expected)
    with pytest.raises(ConfigError, match="reconstruction_size 5 must divide image_size 16"):
        train_config_from_dict({"kind": "gan", "gan": {"image_size": 16, "reconstruction_size": 5}})


def test_feature_matching_term_known_answer(tiny_clip):
    """gan.feature_matching_weight adds w * mean |D_map(aug G(z, caption)) - D_map(aug x)| / mean |D_map(aug x)|
    to G's loss (D's 4 x 4 feature map, both images with G's augmentation view): zero when G draws the
    real image itself; refused without the conv discriminator."""
    from vgen.families import build_family
    from vgen.families.gan import VIEW_FAKE_G

    cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "gan": {"image_size": 16, "augment": ["translation"],
                                          "generator": {"width": 32, "z_dim": 8}, "discriminator": {"width": 8}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    torch.manual_seed(0)
    batch = {"real": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["red", "blue"], "wrong_captions": ["blue", "red"],
             "wrong_hard": torch.tensor([False, False]), "z": torch.randn(2, 8), "augment": torch.rand(2, 4, 7)}
    d = family.model.d
    with torch.no_grad():
        fake = family.model.g(batch["z"], batch["captions"])
        base, _ = family.g_loss(family.model.g, batch, 0)
        family.cfg.gan.feature_matching_weight = 2.0
        loss, logs = family.g_loss(family.model.g, batch, 0)
        fake_map, real_map = (d.feature_map(family._augment(x, batch, VIEW_FAKE_G)) for x in (fake, batch["real"]))
        expected = (fake_map - real_map).abs().mean() / real_map.abs().mean()
        torch.testing.assert_close(logs["g_fm"], expected)
        torch.testing.assert_close(loss, base + 2.0 * expected)
        _, logs = family.g_loss(family.model.g, {**batch, "real": fake}, 0)
        assert logs["g_fm"] == 0
    # The term reaches G through D's map of its image: G's gradient is that of the adversarial term
    # plus 2 x the term's own (D frozen, as the loop keeps it in the g phase).
    d.requires_grad_(False)
    g_params = [p for p in family.model.g.generator.parameters()]

    def gradient(weight: float | None) -> torch.Tensor:
        family.model.g.zero_grad()
        if weight is None:  # the term alone, written out
            image = family.model.g(batch["z"], batch["captions"])
            ((d.feature_map(family._augment(image, batch, VIEW_FAKE_G)) - real_map).abs().mean()
             / real_map.abs().mean()).backward()
        else:
            family.cfg.gan.feature_matching_weight = weight
            family.g_loss(family.model.g, batch, 0)[0].backward()
        return torch.cat([p.grad.flatten() for p in g_params])

    plain, with_term, term = gradient(0.0), gradient(2.0), gradient(None)
    assert term.abs().sum() > 0
    torch.testing.assert_close(with_term, plain + 2.0 * term)
    # Under torchrun the scale is the whole batch's: the mean over processes of each one's mean.
    with torch.no_grad(), mock.patch("vgen.families.gan_terms.all_reduce", lambda t, op: t * 0 + 4.0):
        _, logs = family.g_loss(family.model.g, batch, 0)
        torch.testing.assert_close(logs["g_fm"], (fake_map - real_map).abs().mean() / 4.0)
    with pytest.raises(ConfigError, match="feature_matching_weight needs discriminator.backbone: conv"):
        train_config_from_dict({"kind": "gan", "gan": {"feature_matching_weight": 1.0,
                                                       "discriminator": {"backbone": "clip"}}})


def test_d_phase_judges_the_images_of_the_g_phase(tiny_clip):
    """The phases run g then d; d judges the images G drew in that step's g phase (one generator
    pass a step), and draws its own when it runs alone or on another batch."""
    from vgen.families import build_family

    cfg = train_config_from_dict({"kind": "gan", "text_encoder": {"source": f"local-dir:{tiny_clip}"},
                                  "gan": {"image_size": 16, "generator": {"width": 32, "z_dim": 8},
                                          "discriminator": {"width": 8}}})
    family = build_family(cfg, 16, torch.device("cpu"))
    assert [phase.name for phase in family.phases()] == ["g", "d"]
    calls = []
    family.model.g.generator.register_forward_hook(lambda module, args, out: calls.append(out.detach()))

    def batch():
        return {"real": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["red", "blue"],
                "wrong_captions": ["blue", "red"], "wrong_hard": torch.tensor([False, False]),
                "z": torch.randn(2, 8), "augment": torch.rand(2, 4, 7)}

    torch.manual_seed(0)
    first, second = batch(), batch()
    family.g_loss(family.model.g, first, 0)
    drawn = family._drawn[1]
    assert not drawn.requires_grad and torch.equal(drawn, calls[0])
    family.d_loss(family.model.d, first, 0)
    assert len(calls) == 1 and family._drawn is None  # d reused g's images, once
    family.d_loss(family.model.d, second, 1)  # no g phase for this batch: d draws
    assert len(calls) == 2
    family.g_loss(family.model.g, first, 0)
    family.d_loss(family.model.d, second, 1)  # g's images were for another batch
    assert len(calls) == 4


@pytest.mark.slow
def test_gan_learns_colour_names(assets, tmp_path, vgen_cli):
    """A colour name -> a square of that colour, from one generator call; D's accuracies logged."""
    sets = [*gan_sets(assets, 300, every=150), "optim.lr=2e-3"]
    out = tmp_path / "run"
    result = run(vgen_train_cmd(write_config(tmp_path / "c.yaml", sets), assets["data"], out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss_d" in r]
    assert {"loss_d", "loss_g", "d_real", "d_fake", "d_mismatch", "grad_norm_d", "grad_norm_g"} <= train_rows[-1].keys()
    assert any("r1" in r for r in train_rows)
    assert any("val_d_real" in r for r in rows)
    assert "loss_d" in result.stderr and "loss_g" in result.stderr  # the progress line
    assert (out / "samples" / "step-00000300.png").is_file()

    gen = tmp_path / "gen"
    names = list(COLOURS)
    made = vgen_cli("generate", *names, "--run", out, "-o", gen, "--json")
    assert made.exit_code == 0, made.stderr
    from PIL import Image

    import numpy as np

    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    manifest = yaml.safe_load((gen / "generation.yaml").read_text())
    right = 0
    for row in manifest["images"]:
        pixels = np.asarray(Image.open(gen / row["file"]), dtype=np.float32)
        centre = pixels[6:10, 6:10].reshape(-1, 3).mean(0)
        right += names[int(np.linalg.norm(palette - centre, axis=1).argmin())] == row["prompt"]
    assert right >= len(names) - 1, right
    assert manifest["model"]["kind"] == "gan" and manifest["settings"]["steps"] is None
    # each image from its own seed, whatever the batch: one at a time gives the same pixels
    alone = vgen_cli("generate", *names, "--run", out, "-o", tmp_path / "alone", "--batch-size", "1")
    assert alone.exit_code == 0, alone.stderr
    assert [Image.open(f).tobytes() for f in sorted(gen.glob("*.png"))] == \
        [Image.open(f).tobytes() for f in sorted((tmp_path / "alone").glob("*.png"))]


@pytest.mark.slow
def test_gan_refuses_sampler_flags(assets, tmp_path, vgen_cli):
    out = tmp_path / "run"
    assert run(vgen_train_cmd(write_config(tmp_path / "c.yaml", gan_sets(assets, 2)), assets["data"], out)).returncode == 0
    for flags, named in ((["--steps", "4"], "--steps"), (["--sampler", "heun"], "--sampler"),
                         (["--init-image", str(tmp_path / "x.png"), "--strength", "0.5"], "--init-image"),
                         (["--guidance", "2"], "--guidance")):
        result = vgen_cli("generate", "red", "--run", out, "-o", tmp_path / "g", *flags)
        assert result.exit_code == 2 and named in result.stderr and "gan" in result.stderr, result.stderr
        assert not (tmp_path / "g").exists()
    ok = vgen_cli("generate", "red", "blue", "--run", out, "-o", tmp_path / "g", "--batch-size", "1")
    assert ok.exit_code == 0, ok.stderr
    again = vgen_cli("generate", "red", "blue", "--run", out, "-o", tmp_path / "g2", "--batch-size", "2")
    a = sorted((tmp_path / "g").glob("*.png"))
    b = sorted((tmp_path / "g2").glob("*.png"))
    from PIL import Image

    assert again.exit_code == 0 and [Image.open(p).tobytes() for p in a] == [Image.open(p).tobytes() for p in b]


@pytest.mark.slow
def test_gan_resume_after_sigkill_is_bit_identical(assets, tmp_path):
    sets = [*gan_sets(assets, 24, checkpoint_every=4, every=12), *CONTRASTIVE, *FEATURE_MATCHING]
    config = write_config(tmp_path / "c.yaml", sets)
    killed = assert_resume_after_sigkill_is_bit_identical(config, assets["data"], tmp_path)
    assert any(k.startswith("d.state.") for k in final_weights(killed, "optimizer"))  # both optimizers


@pytest.mark.slow
def test_gan_torchrun_two_processes_match_one(assets, tmp_path):
    # R1 (a double backward through DDP) at steps 0 and 2, both optimizers, augmentation, feature
    # matching; the contrastive term in groups of 8 (each process's local batch of 8 is one group,
    # as in one process's batch of 16). A GAN amplifies rounding differences: the largest relative difference
    # of a weight is about 1e-4 after one step, 1e-3 after two, 2e-3 after three (the zero-initialised
    # cross-attention outputs, which sign-like Adam steps with beta1 0 move by +-lr per element;
    # bench/RESULTS.md). A gradient left unaveraged flips the signs of such steps wholesale: far past 1e-2.
    sets = [*gan_sets(assets, 3), "gan.r1_every=2", *CONTRASTIVE, *FEATURE_MATCHING]
    config = write_config(tmp_path / "c.yaml", sets)
    assert_two_processes_match_one(config, assets["data"], tmp_path, rtol=1e-2)
