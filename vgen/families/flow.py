"""Kind `flow`: a text-conditioned rectified-flow generator (vgen.diffusion.flow) on any network of
vgen.models.NETWORKS (`flow.network.type`: dit, unet), in pixel space or in a codec's latent space
(`codec:`, vgen.codecs): the network's `image_size` and `channels` are those of the space it
works in (16 and 4 for 64 px images through a factor-4 codec with 4 latent channels)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vgen.atomic import atomic_path
from vgen.codecs import ModelSpace, load_codec
from vgen.codecs.cache import encode_split
from vgen.config import bounded, check_bounds, chosen_by
from vgen.diffusion.flow import flow_loss, interpolate, logit_normal_t
from vgen.diffusion.samplers import SAMPLERS, classifier_free_guidance, time_grid, truncate_grid
from vgen.errors import ConfigError, ManifestError
from vgen.families.base import DEFAULT_SAMPLE_PROMPTS, Family, Phase, SampleSettings, in_fixed_batches, index_chunks
from vgen.grid import images_to_float, make_grid, to_uint8
from vgen.models import NETWORK_CONFIGS, build_network
from vgen.models.flow_model import TextToImageFlow
from vgen.randomness import STREAM_CAPTION, STREAM_SAMPLE, STREAM_VALIDATION, generator, initial_noise, mix_seed


@dataclass
class FlowConfig:
    network: Any = chosen_by("type", NETWORK_CONFIGS, "dit")  # dit | unet, and that network's settings
    # share of samples trained unconditionally, for classifier-free guidance
    cond_dropout: float = bounded(0.1, ge=0, lt=1)
    logit_mean: float = 0.0
    logit_std: float = bounded(1.0, gt=0)
    sample_steps: int = bounded(20, ge=1)
    sample_guidance: float = bounded(3.0, ge=0)  # 1: no guidance
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seeds: int = bounded(4, ge=1)  # images per prompt in the sample grids

    def __post_init__(self) -> None:
        check_bounds(self)


@torch.no_grad()
def sample_flow(model, prompts: list[str], seeds: list[int], image_shape: tuple[int, int, int], *,
                steps: int, guidance: float, sampler: str = "euler", negative_prompts: list[str] | None = None,
                edit=None, autocast=contextlib.nullcontext, device: str | torch.device = "cpu") -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] (float, on `device`) for prompt i with seed i.

    Classifier-free guidance runs the conditioned and the unconditioned (negative-prompted; the
    empty caption by default, which is what condition dropout trained) halves in one network call.
    `edit` (vgen.generate.EditInputs): SDEdit from its image at its strength, inpainting with its mask.
    """
    noise = initial_noise(seeds, image_shape).to(device)
    cond = model.encode_text(list(prompts))  # outside autocast: text features stay in fp32
    ts = time_grid(steps, device=device)

    if guidance == 1.0:  # no guidance: the unconditioned half would be thrown away
        def denoiser(x, t):
            with autocast():
                return model.velocity(x, t, cond).float()
    else:
        uncond = model.encode_text(list(negative_prompts or [""] * len(prompts)))
        both = type(cond)(*(torch.cat([c, u]) for c, u in zip(cond, uncond)))

        def velocity_pair(x, t):
            with autocast():
                return model.velocity(x, t, both).float()

        denoiser = classifier_free_guidance(velocity_pair, guidance)

    x, after_step = noise, None
    if edit is not None:
        x0 = edit.image.to(device).expand_as(noise)
        # SDEdit (Meng et al. 2022, arXiv:2108.01073): put the image on the straight path at
        # t = strength, x_t = (1 - t) x0 + t eps, and integrate the ODE from there to t = 0.
        ts = truncate_grid(ts, edit.strength)
        x = interpolate(x0, noise, ts[:1].repeat(len(seeds)))
        if edit.mask is not None:
            regenerate = edit.mask.to(device)
            keep = 1.0 - regenerate

            # Inpainting by replacement (the "replacement" method of Song et al. 2021,
            # arXiv:2011.13456, app. I; RePaint, Lugmayr et al. 2022, arXiv:2201.09865, without
            # resampling): after every step the known region is set to where the image itself is
            # on the path at t_next, with the image's own noise, so at t = 0 it is the input exactly.
            def after_step(x, t_next):
                return regenerate * x + keep * ((1 - t_next) * x0 + t_next * noise)

    return SAMPLERS[sampler](denoiser, x, ts, after_step)


class FlowFamily(Family):
    kind = "flow"
    section = "flow"
    Config = FlowConfig
    supports = frozenset({"steps", "sampler", "guidance", "negative_prompt", "init_image", "mask"})
    samplers = tuple(SAMPLERS)
    uses_codec = True

    def __init__(self, cfg, resolution: int, device: torch.device):
        from vgen.text.encoder import load_text_encoder

        super().__init__(cfg, resolution, device)
        net = cfg.flow.network
        codec = load_codec(cfg.codec, net.channels, device)
        self.space = ModelSpace(codec)
        if resolution is not None:
            self.resolution = resolution
            try:
                shape = codec.latent_shape(resolution)
            except ValueError as e:
                raise ConfigError(f"codec {cfg.codec}: {e}") from None
            if (net.channels, net.image_size) != shape[:2]:
                through = "" if codec.is_pixels else f" through codec {cfg.codec} ({codec.channels} channels, /{codec.factor})"
                raise ConfigError(f"flow.network is {net.channels} x {net.image_size} px, but the dataset's {resolution} px "
                                  f"images are {shape[0]} x {shape[1]} px{through}; set --set "
                                  f"flow.network.image_size={shape[1]} --set flow.network.channels={shape[0]}")
        else:
            self.resolution = net.image_size * codec.factor
        encoder = load_text_encoder(cfg.text_encoder).to(device)
        self.model = TextToImageFlow(build_network(net, encoder.width, encoder.embed_dim), encoder).to(device)
        self._encoded: dict[int, torch.Tensor] = {}  # id(dataset) -> its latents (latent codecs), as encoded

    def prepare(self, train_set, val_set, on_main) -> dict:
        """A latent codec: encode both splits once (cached on disk, vgen.codecs.cache), and measure
        the standardization on the training set's latents."""
        codec = self.space.codec
        if codec.is_pixels:
            return {}
        from vgen.data.dataset import dataset_content_sha256

        sha = dataset_content_sha256(train_set.root)
        for dataset in dict.fromkeys([train_set, val_set]):
            on_main(lambda: encode_split(codec, dataset, sha, self.device))  # written once, then read by all
            self._encoded[id(dataset)] = encode_split(codec, dataset, sha, self.device, write=False)
        # Standardized when read (_model_space), so that a run started from another (vgen.adaptation)
        # can take that run's shift and scale through `restore` instead of these.
        self.space.shift, self.space.scale = ModelSpace.measure(self._encoded[id(train_set)])
        return {"codec": self.space.describe()}

    def restore(self, recorded: dict, where: str) -> None:
        codec = self.space.codec
        if codec.is_pixels:
            return
        entry = recorded.get("codec")
        if not isinstance(entry, dict) or not {"shift", "scale", "sha256"} <= set(entry):
            raise ManifestError(f"{where}: codec: expected the latent codec's source, sha256, shift and scale that "
                                f"training recorded, got {entry!r}")
        if entry["sha256"] != codec.sha256:
            raise ManifestError(f"{where}: the run was trained in the latents of codec {entry.get('source')} (sha256 "
                                f"{str(entry['sha256'])[:12]}), but {codec.source} now holds {str(codec.sha256)[:12]}; "
                                "the generator only knows the latents it was trained in")
        self.space.shift, self.space.scale = float(entry["shift"]), float(entry["scale"])

    def _model_space(self, dataset, indices: list[int]) -> torch.Tensor:
        """Dataset images `indices` in the space the network works in, on the device."""
        if self.space.codec.is_pixels:
            return images_to_float(torch.stack([dataset.image(i) for i in indices])).to(self.device)
        return self.space.standardize(self._encoded[id(dataset)][indices]).to(self.device)

    def compile(self) -> None:
        """torch.compile the denoiser only: tokenizing and the text cache are Python, not graphs."""
        self.model.network.compile()

    @property
    def matmul_width(self) -> int:
        return getattr(self.cfg.flow.network, "width", 256)

    def phases(self) -> list[Phase]:
        return [Phase("denoiser", self.model, self.loss, self.cfg.optim)]

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        """Images, captions and the per-sample noise, timestep and dropout of global samples `indices`."""
        seed, flow = self.cfg.train.seed, self.cfg.flow
        captions, noise, normals, drops = [], [], [], []
        for g in indices:
            caption = dataset.caption(order(g), caption_seed=mix_seed(seed, STREAM_CAPTION, g))
            rng = generator(seed, STREAM_SAMPLE, g)
            noise.append(torch.randn(self.model_shape, generator=rng))
            normals.append(torch.randn((), generator=rng))
            drops.append(torch.rand((), generator=rng) < flow.cond_dropout)
            captions.append("" if drops[-1] else caption)
        return {
            "x0": self._model_space(dataset, [order(g) for g in indices]),
            "noise": torch.stack(noise).to(self.device),
            "t": logit_normal_t(torch.stack(normals), flow.logit_mean, flow.logit_std).to(self.device),
            "captions": captions,
        }

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Mean over this process's samples; DDP's gradient averaging makes it the global mean."""
        x_t = interpolate(batch["x0"], batch["noise"], batch["t"])
        v = model(x_t, batch["t"], batch["captions"])
        return flow_loss(v, batch["x0"], batch["noise"]).mean(), {}

    def validate(self, model, ema, dataset, count: int, autocast) -> dict:
        return {"val_loss": self.val_loss(model, dataset, count, autocast),
                "val_loss_ema": self.val_loss(ema, dataset, count, autocast)}

    @torch.no_grad()
    def val_loss(self, model, dataset, count: int, autocast) -> float:
        """Velocity loss on the first `count` images with fixed noise and an evenly spaced t grid,
        so successive values are comparable (the training loss is noisy by construction)."""
        n = min(count, len(dataset))
        if n == 0:
            return float("nan")
        total = 0.0
        for idx in index_chunks(n):
            x0 = self._model_space(dataset, idx)
            captions = [dataset.caption(i, caption_seed=i) for i in idx]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(0, STREAM_VALIDATION, i)) for i in idx])
            t = torch.tensor([(i + 0.5) / n for i in idx])
            noise, t = noise.to(self.device), t.to(self.device)
            with autocast():
                v = model(interpolate(x0, noise, t), t, captions)
            total += flow_loss(v, x0, noise).sum().item()
        return total / n

    def write_samples(self, ema, path: Path, autocast) -> None:
        flow = self.cfg.flow
        prompts = [p for p in flow.sample_prompts for _ in range(flow.sample_seeds)]
        seeds = [s for _ in flow.sample_prompts for s in range(flow.sample_seeds)]
        settings = SampleSettings(steps=flow.sample_steps, guidance=flow.sample_guidance, sampler="euler")
        images = self.sample(ema, prompts, seeds, settings, autocast, self.device)
        grid = make_grid(to_uint8(images), columns=flow.sample_seeds, row_labels=flow.sample_prompts)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")

    def export(self, run_dir: Path, ema) -> dict:
        return {"format": "vgen-flow", "text_encoder": self.model.text_encoder.id}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels = self.cfg.flow.network.channels if self.space.codec.is_pixels else 3
        return channels, self.resolution, self.resolution

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """The shape the network draws in: the image's, or the codec's latent grid."""
        net = self.cfg.flow.network
        return net.channels, net.image_size, net.image_size

    def sample_defaults(self) -> dict:
        return {"steps": self.cfg.flow.sample_steps, "guidance": self.cfg.flow.sample_guidance, "sampler": "euler"}

    def sample(self, model, prompts, seeds, settings: SampleSettings, autocast, device) -> torch.Tensor:
        """Euler/Heun + classifier-free guidance: the same function for the training grids and
        `vgen generate`, so a grid and a generation agree. Through a latent codec, the edit's image
        is encoded and its mask taken to the latent grid (vgen.codecs.base.Codec.mask_to_latent);
        after decoding, the pixels outside the mask are the input's own again, so "known pixels
        are kept" holds exactly as in pixel space (the latents alone would keep them only to the
        codec's reconstruction error).

        The network runs on FIXED_BATCH images at a time (`in_fixed_batches`): a CPU matmul's sums
        are blocked by its row count, so an image's velocity differs in the last bits with the
        batch it is drawn in, and 20 steps and a decoder can make that one level of 255."""
        negatives = settings.negative_prompts

        def rows_of(rows: torch.Tensor) -> torch.Tensor:
            rows = rows.tolist()
            picked = dataclasses.replace(settings, negative_prompts=None if negatives is None else
                                         [negatives[i] for i in rows])
            return self._sample(model, [prompts[i] for i in rows], [seeds[i] for i in rows], picked, autocast,
                                device)

        return in_fixed_batches(rows_of, len(prompts))

    def _sample(self, model, prompts, seeds, settings: SampleSettings, autocast, device) -> torch.Tensor:
        edit = settings.edit
        if self.space.codec.is_pixels:
            return sample_flow(model, prompts, seeds, self.image_shape, steps=settings.steps,
                               guidance=settings.guidance, sampler=settings.sampler,
                               negative_prompts=settings.negative_prompts, edit=edit, autocast=autocast, device=device)
        latent_edit = None
        if edit is not None:
            mask = None if edit.mask is None else self.space.codec.mask_to_latent(edit.mask)
            latent_edit = dataclasses.replace(edit, image=self.space.encode(edit.image[None].to(device))[0], mask=mask)
        z = sample_flow(model, prompts, seeds, self.model_shape, steps=settings.steps, guidance=settings.guidance,
                        sampler=settings.sampler, negative_prompts=settings.negative_prompts, edit=latent_edit,
                        autocast=autocast, device=device)
        images = self.space.decode(z)
        if edit is not None and edit.mask is not None:
            regenerate = edit.mask.to(device)
            images = regenerate * images + (1 - regenerate) * edit.image.to(device)
        return images
