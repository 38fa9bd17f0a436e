"""Kind `ar`: a language model that writes images. A decoder-only transformer (vgen.models.ar)
predicts the tokens of a discrete image tokenizer (`codec: run:TOKENIZER_RUN`, a vgen vae run with
`autoencoder.quantizer: fsq`) one after another in raster order after the caption, trained by
next-token cross-entropy (DALL-E, Ramesh et al. 2021; LlamaGen, Sun et al. 2024); the tokenizer's
decoder turns the written tokens into pixels.

The training set's tokens are encoded once and cached, keyed by the tokenizer's sha256
(vgen.codecs.cache, as latent flow's latents). Captions are dropped (replaced by the empty one) for
`cond_dropout` of the samples, so that sampling can guide the logits away from the unconditioned
ones (classifier-free guidance). Sampling: vgen.families.ar_sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vgen.atomic import atomic_path
from vgen.codecs import RUN_PREFIX, load_codec
from vgen.codecs.cache import encode_split
from vgen.config import bounded, check_bounds
from vgen.errors import ConfigError, ManifestError
from vgen.families.ar_sampling import sample_tokens
from vgen.families.base import DEFAULT_SAMPLE_PROMPTS, Family, Phase, SampleSettings, in_fixed_batches, index_chunks
from vgen.grid import make_grid, to_uint8
from vgen.models.ar import ArNetworkConfig, TokenTransformer
from vgen.models.conditioned import TextConditioned
from vgen.randomness import STREAM_CAPTION, STREAM_SAMPLE, generator, mix_seed


@dataclass
class ArConfig:
    network: ArNetworkConfig = field(default_factory=ArNetworkConfig)
    cond_dropout: float = bounded(0.1, ge=0, lt=1)  # share of samples trained on the empty caption
    sample_guidance: float = bounded(3.0, ge=0)  # 1: no guidance
    sample_temperature: float = bounded(1.0, gt=0)
    sample_top_k: int = bounded(0, ge=0)  # 0: every token
    sample_top_p: float = bounded(1.0, gt=0, le=1)  # 1: every token
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seeds: int = bounded(4, ge=1)

    def __post_init__(self) -> None:
        check_bounds(self)


class TextToTokens(TextConditioned):
    """`logits(tokens, captions)`: the transformer plus the text encoder it is conditioned on."""

    def __init__(self, network: TokenTransformer, text_encoder):
        super().__init__()
        self.network = network
        self.hold_text_encoder(text_encoder)

    def forward(self, tokens: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return self.network(tokens, self.encode_text(captions))


class ArFamily(Family):
    kind = "ar"
    section = "ar"
    Config = ArConfig
    uses_codec = True
    supports = frozenset({"guidance", "negative_prompt", "temperature", "top_k", "top_p"})

    def __init__(self, cfg, resolution: int, device: torch.device):
        from vgen.text.encoder import load_text_encoder

        super().__init__(cfg, resolution, device)
        if not cfg.codec.startswith(RUN_PREFIX):
            raise ConfigError(f"codec: kind ar writes the tokens of a discrete image tokenizer: expected "
                              f"'{RUN_PREFIX}TOKENIZER_RUN' (a vae run with autoencoder.quantizer fsq, e.g. "
                              f"configs/tokenizer-tiny-cpu.yaml), got {cfg.codec!r}")
        self.codec = load_codec(cfg.codec, 3, device)
        if self.codec.quantizer is None:
            raise ConfigError(f"codec {cfg.codec}: this vae run has a continuous latent (autoencoder.quantizer "
                              "none); kind ar needs a tokenizer: train one with configs/tokenizer-tiny-cpu.yaml")
        if resolution is None:
            raise ConfigError("kind ar needs the dataset's resolution")  # runs.py passes the recorded one
        try:
            _, grid, _ = self.codec.latent_shape(resolution)
        except ValueError as e:
            raise ConfigError(f"codec {cfg.codec}: {e}") from None
        self.resolution, self.grid = resolution, grid
        encoder = load_text_encoder(cfg.text_encoder).to(device)
        network = TokenTransformer(cfg.ar.network, self.codec.quantizer.codebook_size, grid, encoder.width)
        self.model = TextToTokens(network, encoder).to(device)
        self._tokens: dict[int, torch.Tensor] = {}  # id(dataset) -> its token ids [N, grid * grid]

    @property
    def count(self) -> int:
        return self.grid * self.grid

    def prepare(self, train_set, val_set, on_main) -> dict:
        """Tokenize both splits once (cached on disk under the tokenizer's sha256)."""
        from vgen.data.dataset import dataset_content_sha256

        sha = dataset_content_sha256(train_set.root)
        for dataset in dict.fromkeys([train_set, val_set]):
            on_main(lambda: encode_split(self.codec, dataset, sha, self.device))
            codes = encode_split(self.codec, dataset, sha, self.device, write=False)
            self._tokens[id(dataset)] = self.codec.quantizer.indices(codes.to(self.device)).flatten(1).cpu()
        return {"codec": self.codec.describe()}

    def restore(self, recorded: dict, where: str) -> None:
        entry = recorded.get("codec")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise ManifestError(f"{where}: codec: expected the tokenizer's source and sha256 that training "
                                f"recorded, got {entry!r}")
        if entry["sha256"] != self.codec.sha256:
            raise ManifestError(f"{where}: the run writes the tokens of tokenizer {entry.get('source')} (sha256 "
                                f"{str(entry['sha256'])[:12]}), but {self.codec.source} now holds "
                                f"{str(self.codec.sha256)[:12]}; its tokens mean other images")

    def compile(self) -> None:
        self.model.network.compile()

    @property
    def matmul_width(self) -> int:
        return self.cfg.ar.network.width

    def phases(self) -> list[Phase]:
        return [Phase("transformer", self.model, self.loss, self.cfg.optim)]

    def make_batch(self, dataset, order, step: int, indices: list[int]) -> dict:
        seed, captions = self.cfg.train.seed, []
        for g in indices:
            caption = dataset.caption(order(g), caption_seed=mix_seed(seed, STREAM_CAPTION, g))
            dropped = torch.rand((), generator=generator(seed, STREAM_SAMPLE, g)) < self.cfg.ar.cond_dropout
            captions.append("" if dropped else caption)
        tokens = self._tokens[id(dataset)][[order(g) for g in indices]]
        return {"tokens": tokens.to(self.device), "captions": captions}

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Next-token cross-entropy, the mean over this process's tokens (DDP averages the processes)."""
        logits = model(batch["tokens"], batch["captions"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["tokens"].flatten()), {}

    @torch.no_grad()
    def val_loss(self, model, dataset, count: int, autocast) -> float:
        """Cross-entropy (nats per token) of the first `count` images' tokens with their captions."""
        n = min(count, len(dataset))
        if n == 0:
            return float("nan")
        total = 0.0
        for idx in index_chunks(n):
            tokens = self._tokens[id(dataset)][idx].to(self.device)
            with autocast():
                logits = model(tokens, [dataset.caption(i, caption_seed=i) for i in idx])
            total += F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum").item()
        return total / (n * self.count)

    def validate(self, model, ema, dataset, count: int, autocast) -> dict:
        return {"val_loss": self.val_loss(model, dataset, count, autocast),
                "val_loss_ema": self.val_loss(ema, dataset, count, autocast)}

    def write_samples(self, ema, path: Path, autocast) -> None:
        ar = self.cfg.ar
        prompts = [p for p in ar.sample_prompts for _ in range(ar.sample_seeds)]
        seeds = [s for _ in ar.sample_prompts for s in range(ar.sample_seeds)]
        settings = SampleSettings(**self.sample_defaults())
        images = self.sample(ema, prompts, seeds, settings, autocast, self.device)
        grid = make_grid(to_uint8(images), columns=ar.sample_seeds, row_labels=ar.sample_prompts)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")

    def export(self, run_dir: Path, ema) -> dict:
        return {"format": "vgen-ar", "text_encoder": self.model.text_encoder.id, "tokens": [self.grid, self.grid],
                "codebook_size": self.codec.quantizer.codebook_size}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.resolution, self.resolution

    def sample_defaults(self) -> dict:
        ar = self.cfg.ar
        return {"guidance": ar.sample_guidance, "temperature": ar.sample_temperature, "top_k": ar.sample_top_k,
                "top_p": ar.sample_top_p}

    def sample(self, model, prompts, seeds, settings: SampleSettings, autocast, device,
               use_cache: bool = True) -> torch.Tensor:
        """Tokens drawn one by one with the KV cache (vgen.families.ar_sampling), then decoded by
        the tokenizer: image i from (prompt i, seed i) alone."""
        cond = model.encode_text(list(prompts))
        guided = settings.guidance != 1.0  # else the unconditioned half is never used
        uncond = model.encode_text(list(settings.negative_prompts or [""] * len(prompts))) if guided else None
        tokens = sample_tokens(model.network, cond, uncond, list(seeds), self.count, guidance=settings.guidance,
                               temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                               use_cache=use_cache, autocast=autocast)
        codes = self.codec.quantizer.codes(tokens.view(-1, self.grid, self.grid))
        return in_fixed_batches(lambda rows: self.codec.decode(codes[rows].to(device)), len(codes))
