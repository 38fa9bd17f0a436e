"""Kind `flow`: a text-conditioned rectified-flow generator (vgen.diffusion.flow) on a DiT."""

from __future__ import annotations

from pathlib import Path

import torch

from vgen.diffusion.flow import flow_loss, interpolate, logit_normal_t
from vgen.generate import sample_images
from vgen.grid import make_grid, to_uint8
from vgen.models.dit import DiT
from vgen.models.flow_model import TextToImageFlow
from vgen.train.config import TrainConfig
from vgen.train.randomness import STREAM_CAPTION, STREAM_SAMPLE, STREAM_VALIDATION, generator, mix_seed
from vgen.errors import ConfigError


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


class FlowTask:
    kind = "flow"

    def __init__(self, cfg: TrainConfig, resolution: int, device: torch.device):
        from vgen.text.encoder import load_text_encoder

        net = cfg.flow.network
        if net.image_size != resolution:
            raise ConfigError(f"flow.network.image_size is {net.image_size} but the dataset is {resolution} px; "
                              f"set --set flow.network.image_size={resolution}")
        self.cfg, self.device = cfg, device
        encoder = load_text_encoder(cfg.text_encoder).to(device)
        self.model = TextToImageFlow(DiT(net, encoder.width, encoder.embed_dim), encoder).to(device)

    def compile(self) -> None:
        """torch.compile the denoiser only: tokenizing and the text cache are Python, not graphs."""
        self.model.network.compile()

    def shared_modules(self) -> list:
        """Objects the EMA copy must share rather than copy (the frozen text encoder)."""
        return [] if self.model.trains_text else [self.model.text_encoder]

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        """Images, captions and the per-sample noise, timestep and dropout of global samples `indices`."""
        seed, flow = self.cfg.train.seed, self.cfg.flow
        images, captions, noise, normals, drops = [], [], [], [], []
        for g in indices:
            item = dataset.item(order(g), caption_seed=mix_seed(seed, STREAM_CAPTION, g))
            rng = generator(seed, STREAM_SAMPLE, g)
            images.append(item["image"])
            noise.append(torch.randn(item["image"].shape, generator=rng))
            normals.append(torch.randn((), generator=rng))
            drops.append(torch.rand((), generator=rng) < flow.cond_dropout)
            captions.append("" if drops[-1] else item["caption"])
        return {
            "x0": images_to_float(torch.stack(images)).to(self.device),
            "noise": torch.stack(noise).to(self.device),
            "t": logit_normal_t(torch.stack(normals), flow.logit_mean, flow.logit_std).to(self.device),
            "captions": captions,
        }

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Mean over this process's samples; DDP's gradient averaging makes it the global mean."""
        x_t = interpolate(batch["x0"], batch["noise"], batch["t"])
        v = model(x_t, batch["t"], batch["captions"])
        return flow_loss(v, batch["x0"], batch["noise"]).mean()

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
        for start in range(0, n, 64):
            idx = list(range(start, min(n, start + 64)))
            x0 = images_to_float(torch.stack([dataset.item(i, caption_seed=i)["image"] for i in idx])).to(self.device)
            captions = [dataset.item(i, caption_seed=i)["caption"] for i in idx]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(0, STREAM_VALIDATION, i)) for i in idx])
            t = torch.tensor([(i + 0.5) / n for i in idx])
            noise, t = noise.to(self.device), t.to(self.device)
            with autocast():
                v = model(interpolate(x0, noise, t), t, captions)
            total += flow_loss(v, x0, noise).sum().item()
        return total / n

    def sample(self, model, prompts: list[str], seeds: list[int], steps: int, guidance: float, autocast) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] for prompt i with seed i, Euler + classifier-free guidance:
        the same function as `vgen generate`, so a training grid and a generation agree."""
        net = self.cfg.flow.network
        return sample_images(model, prompts, seeds, (net.channels, net.image_size, net.image_size), steps=steps,
                             guidance=guidance, sampler="euler", autocast=autocast, device=self.device)

    def write_samples(self, model, path: Path, autocast) -> None:
        flow = self.cfg.flow
        prompts = [p for p in flow.sample_prompts for _ in range(flow.sample_seeds)]
        seeds = [s for _ in flow.sample_prompts for s in range(flow.sample_seeds)]
        images = self.sample(model, prompts, seeds, flow.sample_steps, flow.sample_guidance, autocast)
        grid = make_grid(to_uint8(images), columns=flow.sample_seeds, row_labels=flow.sample_prompts)
        from vgen.atomic import atomic_path

        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")

    def export(self, run_dir: Path, ema_model) -> dict:
        return {"format": "vgen-flow", "text_encoder": self.model.text_encoder.id}
