"""Kind `captioner`: a model that reads an image and writes its caption (vgen.models.captioner).

Trained by next-byte cross-entropy on the dataset's (image, caption) pairs with teacher forcing,
the image read by the patch tokens of a CLIP image tower (`captioner.image_encoder`: the run's own
CLIP, `run:demo/text-encoder`, or any open_clip source; frozen, or fine-tuned with the decoder).
`vgen caption` writes captions with it; `vgen preprocess --caption-with` captions the images a raw
folder has none for. Validation: the val split's loss and the exact-match rate of greedy captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from vgen.atomic import atomic_path
from vgen.config import bounded, check_bounds
from vgen.errors import ConfigError
from vgen.families import caption_decoding
from vgen.families.base import FIXED_BATCH, Family, Phase, in_fixed_batches, index_chunks
from vgen.grid import make_grid
from vgen.models.ar import ArNetworkConfig, TokenTransformer
from vgen.models.captioner import (IGNORE, VOCAB, Captioner, ImageTower, batch_tokens, normalize_caption,
                                   tokens_caption)
from vgen.randomness import STREAM_CAPTION, mix_seed

DECODERS = ("greedy", "beam", "sample")


@dataclass
class ImageEncoderConfig:
    """The open_clip image tower the captioner reads images with."""

    arch: str = "ViT-B-32"  # open_clip.list_models(); local-dir:/run: sources carry their own
    source: str = "laion2b_s34b_b79k"  # as text_encoder.source: a tag, FILE.safetensors, local-dir:PATH, run:PATH
    mode: Literal["frozen", "full"] = "frozen"
    block: int = -1  # which block's patch tokens the decoder reads (-1: the last)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("frozen", "full"):
            raise ValueError(f"mode: expected frozen or full, got {self.mode!r}")


@dataclass
class CaptionerConfig:
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    network: ArNetworkConfig = field(default_factory=lambda: ArNetworkConfig(width=192, depth=3, heads=3,
                                                                             conditioning="cross"))
    context_positions: bool = False  # the patch tokens' 2-D places added again (vgen.models.captioner)
    max_bytes: int = bounded(64, ge=1)  # longer captions are cut (at a character boundary)
    sample_decoder: Literal["greedy", "beam", "sample"] = "greedy"
    sample_beams: int = bounded(4, ge=1)
    sample_temperature: float = bounded(1.0, gt=0)
    sample_images: int = bounded(8, ge=1)  # val images captioned in the training sample grids
    val_caption_images: int = bounded(256, ge=0)  # val images whose greedy captions are scored while training

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.network.text_lexical:
            raise ValueError("network.text_lexical: the captioner's context is image tokens, which have no input "
                             "embeddings; set it false")
        if self.sample_decoder not in DECODERS:
            raise ValueError(f"sample_decoder: expected one of {', '.join(DECODERS)}, got {self.sample_decoder!r}")


@dataclass
class CaptionSettings:
    decoder: str = "greedy"
    beams: int = 4
    temperature: float = 1.0


class CaptionerFamily(Family):
    kind = "captioner"
    section = "captioner"
    Config = CaptionerConfig
    uses_text_encoder = False

    @classmethod
    def why_no_images(cls, cfg, run_dir: Path) -> str | None:
        return f"a captioner run writes captions, not images: use `vgen caption IMAGES --run {run_dir}`"

    def __init__(self, cfg, resolution: int, device: torch.device):
        import open_clip

        from vgen.text.sources import TextEncoderConfig, load_open_clip

        super().__init__(cfg, resolution, device)
        enc = cfg.captioner.image_encoder
        loaded = load_open_clip(TextEncoderConfig(arch=enc.arch, source=enc.source, cache_dir=enc.cache_dir))
        visual = getattr(loaded.model, "visual", None)
        if visual is None or not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ConfigError(f"captioner.image_encoder: {loaded.id} has no ViT image tower "
                              f"({type(visual).__name__}); the captioner reads a ViT's patch tokens")
        preprocess = open_clip.get_model_preprocess_cfg(loaded.model)
        try:
            tower = ImageTower(visual, preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN),
                               preprocess.get("std", open_clip.OPENAI_DATASET_STD), enc.block)
        except ValueError as e:
            raise ConfigError(f"captioner.{e}") from None
        tower = tower.to(device)  # a frozen tower is held outside the module tree: .to() below would miss it
        self.image_encoder_id, self.resolution = loaded.id, resolution
        network = TokenTransformer(cfg.captioner.network, VOCAB, 0, tower.width, sequence=cfg.captioner.max_bytes + 1)
        try:
            self.model = Captioner(network, tower, enc.mode == "full", cfg.captioner.context_positions).to(device)
        except ValueError as e:
            raise ConfigError(f"captioner.{e}") from None
        self._val = None

    @property
    def matmul_width(self) -> int:
        return self.cfg.captioner.network.width

    def compile(self) -> None:
        self.model.network.compile()

    def prepare(self, train_set, val_set, on_main) -> dict:
        self._val = val_set
        return {}

    def phases(self) -> list[Phase]:
        return [Phase("captioner", self.model, self.loss, self.cfg.optim)]

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        seed = self.cfg.train.seed
        items = [dataset.item(order(g), caption_seed=mix_seed(seed, STREAM_CAPTION, g)) for g in indices]
        inputs, targets = batch_tokens([it["caption"] for it in items], self.cfg.captioner.max_bytes)
        return {"images": torch.stack([it["image"] for it in items]).to(self.device),
                "inputs": inputs.to(self.device), "targets": targets.to(self.device)}

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Next-byte cross-entropy, the mean over this process's caption bytes and end markers."""
        logits = model(batch["images"], batch["inputs"]).float()
        targets = batch["targets"]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        real = targets != IGNORE
        accuracy = (logits.argmax(dim=-1) == targets)[real].float().mean()
        return loss, {"byte_acc": accuracy.detach()}

    # --- validation ---
    @torch.no_grad()
    def val_loss(self, model, dataset, count: int, autocast) -> float:
        n = min(count, len(dataset))
        total, tokens = 0.0, 0
        for idx in index_chunks(n):
            inputs, targets = batch_tokens([dataset.caption(i, caption_seed=i) for i in idx], self.cfg.captioner.max_bytes)
            images = torch.stack([dataset.image(i) for i in idx]).to(self.device)
            with autocast():
                logits = model(images, inputs.to(self.device))
            total += F.cross_entropy(logits.float().flatten(0, 1), targets.to(self.device).flatten(),
                                     ignore_index=IGNORE, reduction="sum").item()
            tokens += int((targets != IGNORE).sum())
        return total / tokens if tokens else float("nan")

    def validate(self, model, ema, dataset, count: int, autocast) -> dict:
        out = {"val_loss": self.val_loss(model, dataset, count, autocast),
               "val_loss_ema": self.val_loss(ema, dataset, count, autocast)}
        n = min(self.cfg.captioner.val_caption_images, len(dataset))
        if n:
            images = torch.stack([dataset.image(i) for i in range(n)])
            with autocast():
                written = self.caption(ema, images, CaptionSettings("greedy"), list(range(n)))
            truth = [{normalize_caption(c) for c in dataset.captions[i]} for i in range(n)]
            out["val_exact_match"] = sum(w in t for w, t in zip(written, truth)) / n
        return out

    def write_samples(self, ema, path: Path, autocast) -> None:
        """The first val images, each with the caption the EMA model writes for it."""
        if self._val is None or not len(self._val):
            return
        n = min(self.cfg.captioner.sample_images, len(self._val))
        images = torch.stack([self._val.image(i) for i in range(n)])
        with autocast():
            written = self.caption(ema, images, self.settings(), list(range(n)))
        grid = make_grid(images, columns=min(n, 4), cell_labels=written)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")

    def export(self, run_dir: Path, ema) -> dict:
        return {"format": "vgen-captioner", "image_encoder": self.image_encoder_id, "tokens": "utf-8 bytes"}

    # --- inference (vgen caption) ---
    def settings(self) -> CaptionSettings:
        c = self.cfg.captioner
        return CaptionSettings(c.sample_decoder, c.sample_beams, c.sample_temperature)

    @torch.no_grad()
    def caption(self, model, images: torch.Tensor, settings: CaptionSettings, seeds: list[int]) -> list[str]:
        """Captions of uint8 images [N, 3, H, W] (image i's randomness, when sampling, from seeds[i]).
        The decoder runs on FIXED_BATCH images at a time, so a caption does not depend on the batch."""
        if settings.decoder not in DECODERS:
            raise ConfigError(f"decoder: expected one of {', '.join(DECODERS)}, got {settings.decoder!r}")
        max_tokens = self.cfg.captioner.max_bytes + 1

        def write(rows: torch.Tensor) -> torch.Tensor:
            context = model.context(images[rows].to(self.device))
            if settings.decoder == "beam":
                tokens = caption_decoding.beam_search(model.network, context, max_tokens, settings.beams)
            elif settings.decoder == "sample":
                tokens = caption_decoding.sample(model.network, context, max_tokens, [seeds[r] for r in rows.tolist()],
                                                 settings.temperature)
            else:
                tokens = caption_decoding.greedy(model.network, context, max_tokens)
            return F.pad(tokens.cpu(), (0, max_tokens + 1 - tokens.shape[1]), value=VOCAB - 1)

        tokens = in_fixed_batches(write, len(images), FIXED_BATCH)
        return [tokens_caption(row) for row in tokens.tolist()]
