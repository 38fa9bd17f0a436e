"""Kind `clip`: contrastive image-text training of a small open_clip model on the dataset itself
(Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021).

This is the offline text encoder of the embedded default: its text tower later conditions the
generator, and its image tower gives a feature space for evaluation. The result is exported in
open_clip's own `local-dir` format, so `open_clip.create_model("local-dir:RUN/export")` loads it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vgen.config import bounded, check_bounds
from vgen.families.base import Family, Phase
from vgen.randomness import STREAM_CAPTION, STREAM_SAMPLE, mix_seed
from vgen.text.negatives import swap_content_words
from vgen.distributed import all_gather_with_grad

EXPORT_DIR = "export"
# open_clip's OPENAI_DATASET_MEAN / STD, recorded in the exported preprocess config.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipConfig:
    """A small open_clip CLIP: ViT image tower, transformer text tower, the standard tokenizer."""

    embed_dim: int = bounded(128, ge=1)
    patch_size: int = bounded(4, ge=1)
    vision_width: int = bounded(128, ge=1)
    vision_layers: int = bounded(4, ge=1)
    vision_head_width: int = bounded(32, ge=1)
    text_width: int = bounded(128, ge=1)
    text_layers: int = bounded(4, ge=1)
    text_heads: int = bounded(4, ge=1)
    context_length: int = bounded(32, ge=2)
    # NegCLIP-style hard negatives (Yuksekgonul et al. 2023): each caption with two of its content
    # words swapped ("a dog above a cat" for "a cat above a dog") is an extra negative text for its
    # image, pushing the text tower to encode word order. Off by default: on emoji scenes it did not
    # pay for its longer steps (bench/RESULTS.md, "CLIP hard negatives").
    hard_negatives: bool = False

    def __post_init__(self) -> None:
        check_bounds(self)

    def model_cfg(self, image_size: int) -> dict:
        """The open_clip model config (the `model_cfg` of open_clip_config.json)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "patch_size": self.patch_size,
                "head_width": self.vision_head_width,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


class ClipFamily(Family):
    kind = "clip"
    section = "clip"
    Config = ClipConfig
    uses_text_encoder = False  # it trains its own

    @classmethod
    def why_no_images(cls, cfg, run_dir: Path) -> str | None:
        return (f"a clip run draws no images (it trains a text encoder); to condition a generator on it, train "
                f"one with --set text_encoder.source=run:{run_dir}")

    def __init__(self, cfg, resolution: int, device: torch.device):
        import open_clip

        super().__init__(cfg, resolution, device)
        self.model_cfg = cfg.clip.model_cfg(resolution)
        self.model = open_clip.CLIP(**self.model_cfg).to(device)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.clip.context_length)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def phases(self) -> list[Phase]:
        return [Phase("clip", self.model, self.loss, self.cfg.optim)]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.device).float() / 255.0 - self.mean) / self.std

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        seed = self.cfg.train.seed
        items = [dataset.item(order(g), caption_seed=mix_seed(seed, STREAM_CAPTION, g)) for g in indices]
        captions = [it["caption"] for it in items]
        batch = {
            "images": self.normalize(torch.stack([it["image"] for it in items])),
            "tokens": self.tokenizer(captions).to(self.device),
        }
        if self.cfg.clip.hard_negatives:
            # One negative per sample keeps shapes equal across processes; samples without one
            # (fewer than two content words) repeat their caption and are masked out of the loss.
            negatives = [swap_content_words(c, random.Random(mix_seed(seed, STREAM_SAMPLE, g)))
                         for c, g in zip(captions, indices)]
            batch["negative_tokens"] = self.tokenizer([n or c for n, c in zip(negatives, captions)]).to(self.device)
            batch["negative_valid"] = torch.tensor([n is not None for n in negatives], device=self.device)
        return batch

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Symmetric InfoNCE over the GLOBAL batch: features are gathered from every process (with
        gradients), so the loss does not depend on how the batch is split. Every process computes
        the same loss; the gather's backward sums the W identical gradients and DDP divides by W."""
        tokens = batch["tokens"]
        if "negative_tokens" in batch:
            tokens = torch.cat([tokens, batch["negative_tokens"]])
        image_features, text_features, logit_scale = model(batch["images"], tokens)
        n = batch["images"].shape[0]
        image_features = all_gather_with_grad(image_features.float())
        positives = all_gather_with_grad(text_features[:n].float())
        logits = logit_scale.float() * image_features @ positives.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        text_to_image = F.cross_entropy(logits.T, labels)
        if "negative_tokens" in batch:  # image -> text also ranks every image's swapped caption
            negatives = all_gather_with_grad(text_features[n:].float())
            valid = all_gather_with_grad(batch["negative_valid"].float()) > 0
            negative_logits = logit_scale.float() * image_features @ negatives.T
            negative_logits = negative_logits.masked_fill(~valid[None, :], float("-inf"))
            logits = torch.cat([logits, negative_logits], dim=1)
        return 0.5 * (F.cross_entropy(logits, labels) + text_to_image), {}

    @torch.no_grad()
    def retrieval(self, model, dataset, count: int, autocast) -> dict:
        """Top-1/top-5 retrieval between the first `count` images and their first captions. A hit is a
        retrieved item with the same caption text (emoji captions repeat across images)."""
        n = min(count, len(dataset))
        if n == 0:
            return {}
        captions = [dataset.captions[i][0] if dataset.captions[i] else "" for i in range(n)]
        images = torch.stack([dataset.image(i) for i in range(n)])
        with autocast():
            img = F.normalize(model.encode_image(self.normalize(images)).float(), dim=-1)
            txt = F.normalize(model.encode_text(self.tokenizer(captions).to(self.device)).float(), dim=-1)
        sim = img @ txt.T
        same = torch.tensor([[a == b for b in captions] for a in captions], device=sim.device)
        out = {}
        for name, scores in (("image_to_text", sim), ("text_to_image", sim.T)):
            top = scores.topk(min(5, n), dim=1).indices
            hits = same.gather(1, top)
            out[f"{name}_top1"] = hits[:, 0].float().mean().item()
            out[f"{name}_top5"] = hits.any(dim=1).float().mean().item()
        # Word order (the ARO test of Yuksekgonul et al. 2023): how often an image scores its caption
        # above the same words with two content words swapped. 0.5 is a bag-of-words encoder.
        pairs = [(i, swapped) for i, c in enumerate(captions)
                 if (swapped := swap_content_words(c, random.Random(i))) is not None]
        if pairs:
            with autocast():
                swapped_txt = model.encode_text(self.tokenizer([s for _, s in pairs]).to(self.device))
            swapped_txt = F.normalize(swapped_txt.float(), dim=-1)
            rows = torch.tensor([i for i, _ in pairs], device=sim.device)
            true_scores = sim[rows, rows]
            swapped_scores = (img[rows] * swapped_txt).sum(dim=-1)
            out["word_order_accuracy"] = (true_scores > swapped_scores).float().mean().item()
        return out

    def validate(self, model, ema, dataset, count: int, autocast) -> dict:
        return {f"val_{k}": v for k, v in self.retrieval(ema, dataset, count, autocast).items()}

    def export(self, run_dir: Path, ema_model) -> dict:
        from vgen.text.sources import save_open_clip_local_dir

        save_open_clip_local_dir(ema_model, self.model_cfg, run_dir / EXPORT_DIR)
        return {"format": "open_clip-local-dir", "path": EXPORT_DIR}
