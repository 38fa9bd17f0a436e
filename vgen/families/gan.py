"""Kind `gan`: a text-conditioned GAN (vgen.models.gan), one network call per image.

Two phases per step, in StyleGAN2's order (Karras et al. 2020, arXiv:1912.04958):
  g: the generator learns to make D call its images real for their captions.
  d: the discriminator learns real (image, its caption) -> real, (G(z, caption), caption) -> fake,
     and, matching-aware (Reed et al. 2016; GigaGAN, Kang et al. 2023), (real image, another
     image's caption) -> fake, so it must read the caption; every `r1_every` steps the lazy R1
     penalty (gamma/2) |grad_x D(x)|^2 on the reals (Mescheder et al. 2018, arXiv:1801.04406),
     scaled by `r1_every` (StyleGAN2, sec. B).
Unlike StyleGAN2, whose D phase draws new images from the updated G, D judges the images G drew in
the g phase of the same step (detached, from G before that phase's update): both updates of a
step see the same G and D, a simultaneous step rather than an alternating one, for one generator
pass fewer per step. (The loop hands every phase of a step the same batch object, which is how
the d phase knows the images are its batch's.)
Non-saturating logistic loss (Goodfellow et al. 2014) or hinge (Lim & Ye 2017; Miyato et al. 2018).
Every image D sees, real or fake, is first augmented by DiffAugment (Zhao et al. 2020,
arXiv:2006.10738): translation, cutout and colour, differentiable so G learns through it. Every
random choice (z, the wrong caption, the augmentation parameters) comes from (seed, sample index).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vgen.atomic import atomic_path
from vgen.config import bounded, check_bounds
from vgen.errors import ConfigError
from vgen.families.base import DEFAULT_SAMPLE_PROMPTS, Family, Phase, SampleSettings, in_fixed_batches, index_chunks
from vgen.families.config import OptimConfig
from vgen.families.gan_terms import AUGMENTS, contrastive_loss, diff_augment, feature_matching
from vgen.grid import images_to_float, make_grid, to_uint8
from vgen.models.conditioned import TextConditioned
from vgen.models.gan import (ClipFeatureDiscriminator, Discriminator, DiscriminatorConfig, Generator, GeneratorConfig,
                             SumDiscriminator)
from vgen.randomness import STREAM_CAPTION, STREAM_SAMPLE, STREAM_VALIDATION, generator, initial_noise, mix_seed
from vgen.text.negatives import OneWordNeighbours

# The views of one sample that D sees, each augmented with its own parameters.
VIEW_REAL, VIEW_FAKE_D, VIEW_FAKE_G, VIEW_WRONG = range(4)
STREAM_WRONG_CAPTION = 101  # vgen.randomness streams 1-4 are the loop's; a family's own start here


@dataclass
class GanOptimConfig(OptimConfig):
    """The defaults of both GAN optimisers (`optim:` for G, `gan.d_optim:` for D): StyleGAN2's Adam
    (Karras et al. 2020): beta1 0, a high learning rate, no warm-up."""

    lr: float = bounded(2e-3, gt=0)
    betas: tuple[float, float] = bounded((0.0, 0.99), ge=0, lt=1)
    warmup_steps: int = bounded(0, ge=0)


@dataclass
class GanConfig:
    image_size: int = bounded(32, ge=4)
    channels: int = bounded(3, ge=1)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: Literal["ns", "hinge"] = "ns"  # non-saturating logistic | hinge
    mismatch_weight: float = bounded(1.0, ge=0)  # weight of (real image, wrong caption) -> fake; 0: off
    # the share of wrong captions that are hard negatives: another training caption one word away
    # (vgen.text.negatives.OneWordNeighbours), so D must check every object and relation; the rest
    # are random captions of the training set
    mismatch_hard: float = bounded(0.0, ge=0, le=1)
    r1_gamma: float = bounded(0.1, ge=0)  # 0: no R1
    r1_every: int = bounded(16, ge=1)  # lazy regularisation: R1 on every k-th step, scaled by k
    augment: list[str] = field(default_factory=lambda: list(AUGMENTS))  # DiffAugment policy ([]: none)
    # CLIP guidance (StyleGAN-T, Sauer et al. 2023, sec. 3.3): G also minimises this weight times the
    # squared spherical distance between the CLIP image embedding of its (augmented) image and the
    # caption's text embedding. Needs discriminator.backbone clip, whose tower gives the embedding.
    clip_guidance: float = bounded(0.0, ge=0)
    # Image-text contrastive loss (XMC-GAN, Zhang et al. 2021, arXiv:2101.04702, sec. 3.2) on D's
    # projection scores: in groups of `contrastive_group` samples, D learns to pick each real image's
    # caption among the group's captions, and G to make each of its images pick its own: a signal
    # about the content of every image against many wrong captions at once, where the matching-aware
    # term has one. Groups, not the whole batch, so that torchrun with local batches of a multiple of
    # the group computes the same loss as one process. Needs discriminator.backbone conv.
    contrastive_weight: float = bounded(0.0, ge=0)
    contrastive_group: int = bounded(16, ge=2)
    # Paired reconstruction (pix2pix's L1 term, Isola et al. 2017, arXiv:1611.07004, eq. 3): G also
    # minimises this weight times |G(z, caption) - x| for the real image x of that caption, compared
    # after average pooling both to `reconstruction_size` px (0: the image size). The caption's own
    # image says where each named object goes, a signal D's judgement gives only indirectly; pooled
    # to a coarse grid it asks for the layout and colours and leaves the details to D.
    reconstruction_weight: float = bounded(0.0, ge=0)
    reconstruction_size: int = bounded(0, ge=0)
    # Paired feature matching (pix2pixHD, Wang et al. 2018, arXiv:1711.11585, eq. 4): G also minimises
    # this weight times the L1 distance between the conv discriminator's final feature map (4 x 4
    # places) of its image and that of the real image of the same caption (both with the same
    # augmentation), relative to the real map's mean magnitude. Where pixel L1 asks for the real
    # image's colours, this asks for what D has learnt tells objects apart, place by place: which
    # object the caption puts on which side, a signal D's single logit does not carry.
    feature_matching_weight: float = bounded(0.0, ge=0)
    d_optim: GanOptimConfig = field(default_factory=GanOptimConfig)  # the discriminator's AdamW (G's: `optim`)
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seeds: int = bounded(4, ge=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.clip_guidance > 0 and "clip" not in self.discriminator.backbone:
            raise ValueError("clip_guidance needs discriminator.backbone: clip (its CLIP image tower embeds G's images)")
        if self.contrastive_weight > 0 and self.discriminator.backbone != "conv":
            raise ValueError(f"contrastive_weight needs discriminator.backbone: conv (the one whose projection "
                             f"scores every caption of a group); backbone is {self.discriminator.backbone}")
        if self.feature_matching_weight > 0 and self.discriminator.backbone != "conv":
            raise ValueError(f"feature_matching_weight needs discriminator.backbone: conv (whose feature map it "
                             f"matches); backbone is {self.discriminator.backbone}")
        size = self.reconstruction_size
        if size and (size > self.image_size or self.image_size % size):
            raise ValueError(f"reconstruction_size {size} must divide image_size {self.image_size}")
        unknown = [a for a in self.augment if a not in AUGMENTS]
        if unknown:
            raise ValueError(f"augment: unknown {', '.join(unknown)}; expected some of {', '.join(AUGMENTS)}")


class GanGenerator(TextConditioned):
    """The generator with its text encoder: `forward(z, captions)`; what the EMA averages."""

    def __init__(self, network: Generator, text_encoder: nn.Module):
        super().__init__()
        self.generator = network
        self.hold_text_encoder(text_encoder)

    def forward(self, z: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return self.generator(z, self.encode_text(captions))


class GanModel(nn.Module):
    """The root of a GAN run's modules: `g` (a GanGenerator) and `d` (the discriminator)."""

    def __init__(self, g: GanGenerator, d: Discriminator):
        super().__init__()
        self.g, self.d = g, d


class GanFamily(Family):
    kind = "gan"
    section = "gan"
    Config = GanConfig
    Optim = GanOptimConfig
    supports = frozenset()  # one network call from (z, caption): no steps, sampler, guidance or editing

    def __init__(self, cfg, resolution: int, device: torch.device):
        from vgen.text.encoder import TextEncoder
        from vgen.text.sources import load_open_clip

        super().__init__(cfg, resolution, device)
        gan, te = cfg.gan, cfg.text_encoder
        if resolution is not None and gan.image_size != resolution:
            raise ConfigError(f"gan.image_size is {gan.image_size} but the dataset is {resolution} px; "
                              f"set --set gan.image_size={resolution}")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; each process trains on its share
        if gan.contrastive_weight > 0 and (cfg.train.batch_size // world) % gan.contrastive_group:
            raise ConfigError(f"gan.contrastive_group {gan.contrastive_group} does not divide the batch of "
                              f"{cfg.train.batch_size // world} each of {world} process(es) trains on "
                              f"(train.batch_size {cfg.train.batch_size}); set --set gan.contrastive_group=N "
                              f"with N dividing it")
        clip = load_open_clip(te)
        encoder = TextEncoder(clip, te.mode, te.lora_rank, te.lora_alpha).to(device)
        try:
            g = Generator(gan.generator, gan.image_size, gan.channels, encoder.width, encoder.embed_dim)
            d = self._discriminator(gan, clip, encoder)
        except ValueError as e:
            raise ConfigError(f"gan: {e}") from None
        self.model = GanModel(GanGenerator(g, encoder), d).to(device)
        self._neighbours, self._neighbours_of = None, None  # the hard wrong captions (_wrong_caption)
        self._drawn: tuple[dict, torch.Tensor] | None = None  # (batch, G's images of its g phase), for the d phase

    @staticmethod
    def _discriminator(gan: GanConfig, clip, encoder) -> nn.Module:
        backbone = gan.discriminator.backbone
        conv = Discriminator(gan.discriminator, gan.image_size, gan.channels, encoder.width, encoder.embed_dim) \
            if "conv" in backbone.split("+") else None
        if backbone == "conv":
            return conv
        import open_clip

        if gan.channels != 3:
            raise ValueError(f"discriminator.backbone clip needs RGB images (channels 3), got channels {gan.channels}")
        visual = getattr(clip.model, "visual", None)
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(f"discriminator.backbone clip needs a ViT image tower; {clip.id} has {type(visual).__name__}")
        preprocess = open_clip.get_model_preprocess_cfg(clip.model)
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        clip_d = ClipFeatureDiscriminator(gan.discriminator, visual.to(encoder.device), mean, std, encoder.width,
                                          encoder.embed_dim)
        return clip_d if conv is None else SumDiscriminator(conv, clip_d)

    def ema_target(self) -> nn.Module:
        return self.model.g

    def compile(self) -> None:
        """The generator only: the R1 penalty differentiates D twice, which torch.compile cannot."""
        self.model.g.generator.compile()

    def phases(self) -> list[Phase]:
        return [Phase("g", self.model.g, self.g_loss, self.cfg.optim),
                Phase("d", self.model.d, self.d_loss, self.cfg.gan.d_optim)]

    # --- batches ---
    def _wrong_caption(self, dataset, index: int, caption: str, rng: random.Random) -> tuple[str, bool]:
        """A caption that does not describe this image, and whether it is a hard one: with
        probability gan.mismatch_hard one of the training captions one word away, otherwise (or when
        there is none) another image's caption that differs from this one's (emoji captions
        repeat), or ''."""
        if self.cfg.gan.mismatch_hard > 0 and rng.random() < self.cfg.gan.mismatch_hard:
            if self._neighbours_of is not dataset:  # built once per training set
                self._neighbours = OneWordNeighbours(c for captions in dataset.captions for c in captions)
                self._neighbours_of = dataset
            hard = self._neighbours.choose(caption, rng)
            if hard is not None:
                return hard, True
        for _ in range(8):
            j = rng.randrange(len(dataset))
            if j != index and dataset.captions[j]:
                other = dataset.captions[j][rng.randrange(len(dataset.captions[j]))]
                if other != caption:
                    return other, False
        return "", False

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        seed, gan = self.cfg.train.seed, self.cfg.gan
        images, captions, wrong, z, augment = [], [], [], [], []
        for g in indices:
            index = order(g)
            item = dataset.item(index, caption_seed=mix_seed(seed, STREAM_CAPTION, g))
            rng = generator(seed, STREAM_SAMPLE, g)
            images.append(item["image"])
            captions.append(item["caption"])
            z.append(torch.randn(gan.generator.z_dim, generator=rng))
            augment.append(torch.rand(4, 7, generator=rng))
            wrong.append(self._wrong_caption(dataset, index, item["caption"],
                                             random.Random(mix_seed(seed, STREAM_WRONG_CAPTION, g))))
        return {"real": images_to_float(torch.stack(images)).to(self.device), "captions": captions,
                "wrong_captions": [caption for caption, _ in wrong],
                "wrong_hard": torch.tensor([hard for _, hard in wrong], device=self.device),
                "z": torch.stack(z).to(self.device),
                "augment": torch.stack(augment).to(self.device)}

    def _augment(self, x: torch.Tensor, batch: dict, view: int) -> torch.Tensor:
        policy = self.cfg.gan.augment
        return diff_augment(x, batch["augment"][:, view], policy) if policy else x

    # --- losses ---
    @staticmethod
    def _candidates(text, wrong_text):
        """The captions then the wrong captions of the batch: the columns of contrastive_loss."""
        return type(text)(*(torch.cat(parts) for parts in zip(text, wrong_text)))

    def d_loss(self, d, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        gan, g = self.cfg.gan, self.model.g
        text = g.encode_text(batch["captions"])
        drawn, self._drawn = self._drawn, None
        if drawn is not None and drawn[0] is batch:
            fake = drawn[1]
        else:  # a d phase on its own (tests, tools)
            with torch.no_grad():
                fake = g.generator(batch["z"], text)
        r1_step = gan.r1_gamma > 0 and step % gan.r1_every == 0
        real = batch["real"].detach().requires_grad_(r1_step)
        views = [self._augment(real, batch, VIEW_REAL), self._augment(fake, batch, VIEW_FAKE_D)]
        texts = [text, text]
        wrong_text = g.encode_text(batch["wrong_captions"]) if gan.mismatch_weight or gan.contrastive_weight else None
        if gan.mismatch_weight > 0:
            views.append(self._augment(batch["real"], batch, VIEW_WRONG))
            texts.append(wrong_text)
        # contrastive: also the real view's scores against the captions and the wrong captions
        pairs = len(batch["captions"]) if gan.contrastive_weight > 0 else 0
        candidates = {"pairs": pairs, "candidates": self._candidates(text, wrong_text)} if pairs else {}
        # R1 differentiates D's gradient once more; PyTorch's fused attention kernels (which open_clip's
        # tower uses, backbone clip) have no second derivative, the plain math form has.
        with sdpa_kernel([SDPBackend.MATH]) if r1_step else contextlib.nullcontext():
            out = d(torch.cat(views), type(text)(*(torch.cat(parts) for parts in zip(*texts))), **candidates)
        logits, scores = out if pairs else (out, None)
        parts = logits.chunk(len(views))
        real_logits, fake_logits = parts[0], parts[1]
        if gan.loss == "ns":  # softplus(-x) = -log sigmoid(x)
            loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        else:
            loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        logs = {"d_real": (real_logits > 0).float().mean(), "d_fake": (fake_logits < 0).float().mean()}
        if gan.mismatch_weight > 0:
            wrong_logits = parts[2]
            wrong_loss = F.softplus(wrong_logits).mean() if gan.loss == "ns" else F.relu(1 + wrong_logits).mean()
            loss = loss + gan.mismatch_weight * wrong_loss
            logs["d_mismatch"] = (wrong_logits < 0).float().mean()
            if batch["wrong_hard"].any():  # D's accuracy on the hard ones alone
                logs["d_mismatch_hard"] = (wrong_logits[batch["wrong_hard"]] < 0).float().mean()
        if pairs:
            matching, logs["d_match"] = contrastive_loss(scores, batch["captions"], batch["wrong_captions"],
                                                         gan.contrastive_group)
            loss = loss + gan.contrastive_weight * matching
        if r1_step:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            r1 = grad.float().pow(2).flatten(1).sum(1).mean()
            loss = loss + (gan.r1_gamma / 2) * r1 * gan.r1_every
            logs["r1"] = r1.detach()
        return loss, logs

    def g_loss(self, g, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        fake = g(batch["z"], batch["captions"])
        self._drawn = (batch, fake.detach())
        gan = self.cfg.gan
        with torch.no_grad():  # D judges the caption; the text encoder learns only through G
            text = self.model.g.encode_text(batch["captions"])
            wrong_text = self.model.g.encode_text(batch["wrong_captions"]) if gan.contrastive_weight else None
        logs, d, view = {}, self.model.d, self._augment(fake, batch, VIEW_FAKE_G)
        # feature matching: D's feature map of the view, computed once for both terms
        fake_map = d.feature_map(view) if gan.feature_matching_weight > 0 else None

        def judge(**kwargs):
            return d(view, text, **kwargs) if fake_map is None else d.judge(fake_map, text, **kwargs)

        if gan.clip_guidance > 0:
            logits, image = judge(image_embedding=True)
        elif gan.contrastive_weight > 0:
            logits, scores = judge(pairs=len(batch["captions"]), candidates=self._candidates(text, wrong_text))
        else:
            logits = judge()
        loss = F.softplus(-logits).mean() if gan.loss == "ns" else -logits.mean()
        if gan.contrastive_weight > 0:
            matching, logs["g_match"] = contrastive_loss(scores, batch["captions"], batch["wrong_captions"],
                                                         gan.contrastive_group)
            loss = loss + gan.contrastive_weight * matching
        if gan.reconstruction_weight > 0:
            size = gan.reconstruction_size or gan.image_size
            error = F.adaptive_avg_pool2d(fake.float(), size) - F.adaptive_avg_pool2d(batch["real"].float(), size)
            reconstruction = error.abs().mean()
            loss = loss + gan.reconstruction_weight * reconstruction
            logs["g_l1"] = reconstruction.detach()
        if gan.feature_matching_weight > 0:
            with torch.no_grad():
                real_map = d.feature_map(self._augment(batch["real"], batch, VIEW_FAKE_G))
            matching = feature_matching(fake_map, real_map)
            loss = loss + gan.feature_matching_weight * matching
            logs["g_fm"] = matching.detach()
        if gan.clip_guidance > 0:
            cos = F.cosine_similarity(image, text.pooled.float(), dim=-1)
            distance = torch.arccos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).pow(2).mean()
            loss = loss + gan.clip_guidance * distance
            logs["clip_distance"] = distance.detach()
        return loss, logs

    # --- validation, samples, export ---
    @torch.no_grad()
    def validate(self, model, ema, dataset, count: int, autocast) -> dict:
        """How often D calls the first `count` val images real, and the EMA generator's images
        for the same captions (fixed z) fake: near 0.5 / 0.5 when G keeps up."""
        n = min(count, len(dataset))
        if n == 0:
            return {}
        real_hits = fake_hits = 0.0
        for idx in index_chunks(n):
            real = images_to_float(torch.stack([dataset.item(i, caption_seed=i)["image"] for i in idx])).to(self.device)
            captions = [dataset.item(i, caption_seed=i)["caption"] for i in idx]
            z = torch.stack([torch.randn(self.cfg.gan.generator.z_dim, generator=generator(0, STREAM_VALIDATION, i))
                             for i in idx]).to(self.device)
            with autocast():
                text = ema.encode_text(captions)
                fake = ema.generator(z, text)
                real_hits += (model.d(real, text) > 0).float().sum().item()
                fake_hits += (model.d(fake, text) < 0).float().sum().item()
        return {"val_d_real": real_hits / n, "val_d_fake": fake_hits / n}

    def write_samples(self, ema, path: Path, autocast) -> None:
        gan = self.cfg.gan
        prompts = [p for p in gan.sample_prompts for _ in range(gan.sample_seeds)]
        seeds = [s for _ in gan.sample_prompts for s in range(gan.sample_seeds)]
        images = self.sample(ema, prompts, seeds, SampleSettings(), autocast, self.device)
        grid = make_grid(to_uint8(images), columns=gan.sample_seeds, row_labels=gan.sample_prompts)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")

    def export(self, run_dir: Path, ema) -> dict:
        return {"format": "vgen-gan", "text_encoder": self.model.g.text_encoder.id}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.cfg.gan.channels, self.cfg.gan.image_size, self.cfg.gan.image_size

    @torch.no_grad()
    def sample(self, model, prompts, seeds, settings: SampleSettings, autocast, device) -> torch.Tensor:
        """One generator pass (in batches of FIXED_BATCH): image i from z ~ N(0, I) seeded by seeds[i]
        alone, and prompt i."""
        z = initial_noise(seeds, (self.cfg.gan.generator.z_dim,)).to(device)
        text = model.encode_text(list(prompts))
        with autocast():  # G is convolutional: run at one batch shape (in_fixed_batches)
            return in_fixed_batches(lambda rows: model.generator(z[rows], type(text)(*(t[rows] for t in text))).float(),
                                    len(z))
