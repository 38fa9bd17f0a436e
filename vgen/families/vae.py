"""Kind `vae`: a KL autoencoder (vgen.models.vae), the codec of latent generation, and, with
`vae.text_conditioned`, a text-to-image generator of its own (a conditional VAE sampled from its prior).

The objective is latent-diffusion's (Rombach et al. 2022, arXiv:2112.10752; its
`LPIPSWithDiscriminator`), per image and divided by the number of pixel values so the weights do
not depend on the resolution:
  reconstruction  l1_weight |x - x'| + l2_weight (x - x')^2, the mean over pixel values;
  KL              KL(q(z|x) || N(0, I)) summed over the latent, / pixel values, times kl_weight
                  (tiny for a codec, where z must keep the image; the ELBO's own weight, about
                  l2_weight, for a generator, where z must follow the prior it is sampled from);
  GAN (optional)  from step `gan_start`, a patch discriminator (hinge) and the decoder's
                  adversarial term, weighted adaptively: gan_weight times |grad rec| / |grad adv| at
                  the decoder's last layer (Esser et al. 2021, "Taming Transformers", eq. 7).
Two phases per step when the GAN is on: "autoencoder", then "discriminator" (on the same batch's
reconstructions, as latent-diffusion's second optimizer). Every random choice (the posterior
sample) comes from (seed, sample index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vgen.atomic import atomic_path
from vgen.config import bounded, check_bounds
from vgen.errors import ConfigError, UsageError
from vgen.families.base import DEFAULT_SAMPLE_PROMPTS, Family, Phase, SampleSettings, in_fixed_batches, index_chunks
from vgen.families.config import OptimConfig
from vgen.grid import images_to_float, make_grid, to_uint8
from vgen.models.conditioned import TextConditioned
from vgen.models.quantize import codebook_statistics
from vgen.models.vae import AutoencoderConfig, Decoder, Encoder, PatchDiscriminator
from vgen.randomness import STREAM_CAPTION, STREAM_SAMPLE, generator, initial_noise, mix_seed

GRID_IMAGES = 8  # val images in the reconstruction grids


@dataclass
class VaeOptimConfig(OptimConfig):
    """latent-diffusion's Adam for both networks: betas (0.5, 0.9)."""

    lr: float = bounded(1e-3, gt=0)
    betas: tuple[float, float] = bounded((0.5, 0.9), ge=0, lt=1)


@dataclass
class VaeConfig:
    image_size: int = bounded(64, ge=4)
    # train on random crop_size x crop_size crops (0: whole images), aligned to the latent grid.
    # The networks are convolutional, so what they learn on crops applies to whole images, as
    # latent-diffusion's autoencoders train on 256 px crops and run at 512 px; a crop of half the
    # size costs a quarter of the step. Validation and the grids use whole images.
    crop_size: int = bounded(0, ge=0)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    # a conditional VAE: the decoder also reads the caption (pooled text embedding), and `vgen
    # generate` samples z from the prior N(0, I) and decodes it with the prompt
    text_conditioned: bool = False
    l1_weight: float = bounded(1.0, ge=0)
    l2_weight: float = bounded(1.0, ge=0)
    kl_weight: float = bounded(1e-6, ge=0)
    gan_weight: float = bounded(0.0, ge=0)  # 0: no discriminator, one phase
    gan_start: int = bounded(0, ge=0)  # the step the discriminator and the adversarial term start at
    discriminator_width: int = bounded(32, ge=8)
    discriminator_layers: int = bounded(2, ge=1)
    d_optim: VaeOptimConfig = field(default_factory=VaeOptimConfig)
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seeds: int = bounded(4, ge=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.l1_weight == 0 and self.l2_weight == 0:
            raise ValueError("l1_weight and l2_weight are both 0: nothing would teach the decoder to reconstruct")
        if self.text_conditioned and self.autoencoder.quantizer != "none":
            raise ValueError("text_conditioned samples z from the Gaussian prior N(0, I); a quantized "
                             f"bottleneck (autoencoder.quantizer: {self.autoencoder.quantizer}) has none: "
                             "its tokens are sampled by an autoregressive model instead")
        if self.image_size % self.autoencoder.factor:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the downsampling factor "
                             f"{self.autoencoder.factor} (autoencoder.multipliers)")
        if self.crop_size and self.text_conditioned:
            raise ValueError("crop_size trains on parts of images; a text-conditioned decoder must see the whole "
                             "image its caption describes (set crop_size 0)")
        if self.crop_size and (self.crop_size > self.image_size or self.crop_size % self.autoencoder.factor):
            raise ValueError(f"crop_size {self.crop_size} must be at most image_size {self.image_size} and a multiple "
                             f"of the downsampling factor {self.autoencoder.factor} (0: whole images)")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over the latent (Kingma & Welling
    2014, app. B: -1/2 sum(1 + log s^2 - m^2 - s^2))."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)


class Autoencoder(TextConditioned):
    """encode(x) -> (mean, logvar); decode(z, captions) -> x. The EMA target and what a codec loads."""

    def __init__(self, cfg: AutoencoderConfig, text_encoder: nn.Module | None):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, text_encoder.embed_dim if text_encoder is not None else 0)
        self.conditioned = text_encoder is not None
        if self.conditioned:
            self.hold_text_encoder(text_encoder)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor, captions: list[str] | None = None) -> torch.Tensor:
        pooled = self.encode_text(captions).pooled if self.conditioned else None
        return self.decoder(z, pooled)

    def shared_modules(self) -> list[nn.Module]:
        return super().shared_modules() if self.conditioned else []

    def forward(self, x: torch.Tensor, eps: torch.Tensor, captions: list[str] | None = None):
        """The reconstruction of x through a posterior sample z = mean + std * eps (through the
        quantized code itself, with quantizer fsq: logvar None), and (mean, logvar)."""
        mean, logvar = self.encode(x)
        z = mean if logvar is None else mean + (0.5 * logvar).exp() * eps.to(mean.dtype)
        return self.decode(z, captions), mean, logvar

    def detokenize(self, tokens: torch.Tensor, captions: list[str] | None = None) -> torch.Tensor:
        """Token ids [B, h, w] (quantizer fsq) -> images."""
        return self.decode(self.encoder.quantizer.codes(tokens), captions)


class VaeModel(nn.Module):
    """The root of a vae run's modules: `ae` and, with the GAN on, `d`."""

    def __init__(self, ae: Autoencoder, d: nn.Module | None):
        super().__init__()
        self.ae = ae
        if d is not None:
            self.d = d


class VaeFamily(Family):
    kind = "vae"
    section = "vae"
    Config = VaeConfig
    Optim = VaeOptimConfig
    supports = frozenset()  # one decoder call from (z ~ N(0, I), caption)

    def __init__(self, cfg, resolution: int, device: torch.device):
        super().__init__(cfg, resolution, device)
        vae = cfg.vae
        if resolution is not None and vae.image_size != resolution:
            raise ConfigError(f"vae.image_size is {vae.image_size} but the dataset is {resolution} px; "
                              f"set --set vae.image_size={resolution}")
        encoder = None
        if vae.text_conditioned:
            from vgen.text.encoder import load_text_encoder

            encoder = load_text_encoder(cfg.text_encoder).to(device)
        d = PatchDiscriminator(vae.autoencoder.channels, vae.discriminator_width, vae.discriminator_layers) \
            if vae.gan_weight > 0 else None
        self.model = VaeModel(Autoencoder(vae.autoencoder, encoder), d).to(device)
        self._grid = None  # the val images of the reconstruction grids, taken at the first validation

    @classmethod
    def why_no_images(cls, cfg, run_dir: Path) -> str | None:
        if cfg.vae.text_conditioned:
            return None
        if cfg.vae.autoencoder.quantizer != "none":
            return (f"this vae run is an image tokenizer (autoencoder.quantizer {cfg.vae.autoencoder.quantizer}): it "
                    f"turns images into tokens and back but draws none from prompts; train an autoregressive model on "
                    f"its tokens with `codec: run:{run_dir}` (configs/ar-tiny-cpu.yaml), and `vgen evaluate --codec "
                    f"run:{run_dir}` measures its reconstructions")
        return (f"this vae run is an autoencoder (vae.text_conditioned is false): it encodes and decodes images "
                f"(a codec: `codec: run:{run_dir}` in a flow config; `vgen evaluate --codec run:{run_dir}` measures "
                "its reconstructions) but draws none from prompts; train one with --set vae.text_conditioned=true "
                "(configs/vae-text-cpu.yaml) for a generator")

    def ema_target(self) -> nn.Module:
        return self.model.ae

    def phases(self) -> list[Phase]:
        phases = [Phase("autoencoder", self.model.ae, self.ae_loss, self.cfg.optim)]
        if self.cfg.vae.gan_weight > 0:
            phases.append(Phase("discriminator", self.model.d, self.d_loss, self.cfg.vae.d_optim))
        return phases

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        ae, size = self.cfg.vae.autoencoder, self.cfg.vae.image_size
        return ae.z_channels, size // ae.factor, size // ae.factor

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        seed, vae = self.cfg.train.seed, self.cfg.vae
        crop, factor = vae.crop_size, vae.autoencoder.factor
        shape = self.latent_shape if not crop else (self.latent_shape[0], crop // factor, crop // factor)
        images, captions, eps = [], [], []
        for g in indices:
            item = dataset.item(order(g), caption_seed=mix_seed(seed, STREAM_CAPTION, g))
            rng = generator(seed, STREAM_SAMPLE, g)
            eps.append(torch.randn(shape, generator=rng))
            image = item["image"]
            if crop:  # top-left corner on the latent grid, drawn after eps from the same generator
                cells = (vae.image_size - crop) // factor + 1
                y, x = (factor * int(v) for v in torch.randint(cells, (2,), generator=rng))
                image = image[:, y:y + crop, x:x + crop]
            images.append(image)
            captions.append(item["caption"])
        return {"x": images_to_float(torch.stack(images)).to(self.device), "captions": captions,
                "eps": torch.stack(eps).to(self.device)}

    # --- losses ---
    def _reconstruction(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        vae, error = self.cfg.vae, (y.float() - x.float())
        return vae.l1_weight * error.abs().mean() + vae.l2_weight * error.pow(2).mean()

    def ae_loss(self, ae, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        vae, x = self.cfg.vae, batch["x"]
        y, mean, logvar = ae(x, batch["eps"], batch["captions"] if vae.text_conditioned else None)
        batch["reconstruction"] = y.detach()  # what the discriminator phase sees next
        rec = self._reconstruction(x, y)
        loss, logs = rec, {"rec": rec.detach()}
        if logvar is not None:  # a quantized bottleneck has no posterior variance, and no KL term
            kl = kl_divergence(mean, logvar).mean() / x[0].numel()
            loss = loss + vae.kl_weight * kl
            logs["kl"] = kl.detach()
        if vae.gan_weight > 0 and step >= vae.gan_start:
            # D's parameters are off in this phase (the loop's doing): the term trains the decoder
            adversarial = -self.model.d(y).float().mean()
            last = self.model.ae.decoder.out.weight
            # Taming Transformers' adaptive weight: balance the two gradients at the last layer
            g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
            g_adv = torch.autograd.grad(adversarial, last, retain_graph=True)[0]
            weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()
            loss = loss + vae.gan_weight * weight * adversarial
            logs.update(adversarial=adversarial.detach(), gan_weight=weight)
        return loss, logs

    def d_loss(self, d, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        if step < self.cfg.vae.gan_start:  # not started: no gradient, and the optimizer skips D
            return torch.zeros((), device=self.device, requires_grad=True), {}
        real, fake = d(batch["x"]).float(), d(batch["reconstruction"]).float()
        loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        return loss, {"d_real": (real > 0).float().mean(), "d_fake": (fake < 0).float().mean()}

    # --- validation, samples, export ---
    @torch.no_grad()
    def reconstruct(self, ae, images: torch.Tensor, captions: list[str] | None, autocast,
                    codes: list | None = None) -> torch.Tensor:
        """The posterior mean's reconstruction (no sampling), as a codec decodes what it encoded;
        with a quantized bottleneck, its token ids are appended to `codes` if given."""
        with autocast():
            mean, _ = ae.encode(images)
            if codes is not None and ae.encoder.quantizer is not None:
                codes.append(ae.encoder.quantizer.indices(mean).cpu())
            return ae.decode(mean, captions if self.cfg.vae.text_conditioned else None).float()

    @torch.no_grad()
    def validate(self, model, ema, dataset, count: int, autocast) -> dict:
        """PSNR and SSIM (torchmetrics) of the EMA autoencoder's reconstructions of the first
        `count` val images, in [0, 1], and its reconstruction loss; with a quantized bottleneck, the
        usage and perplexity of its codebook over those images."""
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        n = min(count, len(dataset))
        if n == 0:
            return {}
        psnr = ssim = rec = 0.0
        codes = []
        for idx in index_chunks(n):
            items = [dataset.item(i, caption_seed=i) for i in idx]
            x = images_to_float(torch.stack([item["image"] for item in items])).to(self.device)
            y = self.reconstruct(ema, x, [item["caption"] for item in items], autocast, codes)
            if self._grid is None:
                self._grid = (x[:GRID_IMAGES].cpu(), [item["caption"] for item in items[:GRID_IMAGES]])
            a, b = (y.clamp(-1, 1) + 1) / 2, (x + 1) / 2
            for i in range(len(idx)):  # per image, then averaged: the usual way PSNR is reported
                psnr += peak_signal_noise_ratio(a[i:i + 1], b[i:i + 1], data_range=1.0).item()
            ssim += structural_similarity_index_measure(a, b, data_range=1.0, reduction="sum").item()
            rec += self._reconstruction(x, y).item() * len(idx)
        out = {"val_psnr": psnr / n, "val_ssim": ssim / n, "val_rec": rec / n}
        if codes:
            stats = codebook_statistics(torch.cat(codes), ema.encoder.quantizer.codebook_size)
            out.update({f"val_{k}": v for k, v in stats.items()})
        return out

    def write_samples(self, ema, path: Path, autocast) -> None:
        """Originals above their reconstructions (once a validation has chosen them), and, for a
        text-conditioned VAE, samples from the prior for the sample prompts."""
        vae, rows, labels = self.cfg.vae, [], []
        if self._grid is not None:
            x, captions = self._grid
            rows += [x.to(self.device), self.reconstruct(ema, x.to(self.device), captions, autocast)]
            labels += ["val images", "reconstructions"]
        columns = len(rows[0]) if rows else vae.sample_seeds
        if vae.text_conditioned:
            for prompt in vae.sample_prompts:
                seeds = list(range(columns))
                rows.append(self.sample(ema, [prompt] * columns, seeds, SampleSettings(), autocast, self.device))
                labels.append(prompt)
        if not rows:
            return
        grid = make_grid(to_uint8(torch.cat([r.cpu() for r in rows])), columns=columns, row_labels=labels)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")

    def export(self, run_dir: Path, ema) -> dict:
        ae = self.cfg.vae.autoencoder
        out = {"format": "vgen-vae", "latent_shape": list(self.latent_shape), "factor": ae.factor}
        if ae.quantizer != "none":
            out["quantizer"] = {"kind": ae.quantizer, "levels": list(ae.levels),
                                "codebook_size": self.model.ae.encoder.quantizer.codebook_size}
        if self.cfg.vae.text_conditioned:
            out["text_encoder"] = self.model.ae.text_encoder.id
        return out

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.cfg.vae.autoencoder.channels, self.cfg.vae.image_size, self.cfg.vae.image_size

    @torch.no_grad()
    def sample(self, model, prompts, seeds, settings: SampleSettings, autocast, device) -> torch.Tensor:
        """Image i: z ~ N(0, I) from seeds[i] alone, decoded with prompt i."""
        if not self.cfg.vae.text_conditioned:
            raise UsageError(self.why_no_images(self.cfg, Path("this run")))
        z = initial_noise(seeds, self.latent_shape).to(device)
        with autocast():
            return in_fixed_batches(lambda rows: model.decode(z[rows], [prompts[i] for i in rows]).float(), len(z))
