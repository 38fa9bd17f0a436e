"""The text tower of an open_clip model as the generator's condition: per-token features + pooled embedding.

The generator cross-attends to `tokens` (the final-LayerNorm outputs, one row per context position,
`mask` marking the real ones) and takes `pooled` (exactly open_clip's `encode_text`, unnormalised)
through adaptive norm. The encoder is frozen (default; its embeddings are cached per caption), adapted
with LoRA, or fully fine-tuned.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vgen.errors import UsageError
from vgen.lora import add_lora, lora_parameters
from vgen.text.sources import LoadedClip, TextEncoderConfig, load_open_clip

MODES = ("frozen", "lora", "full")
MAX_CACHE_CAPTIONS = 200_000
CACHE_BYTES = 2 << 30  # default bound on the frozen-feature cache (per-token features are large)


class TextFeatures(NamedTuple):
    tokens: torch.Tensor  # [B, L, width] per-token features (ln_final outputs)
    mask: torch.Tensor  # [B, L] bool: True for start marker, caption tokens and end marker
    pooled: torch.Tensor  # [B, embed_dim] = model.encode_text(tokens, normalize=False)
    embeddings: torch.Tensor  # [B, L, width] the tower's input: token + positional embeddings


def _text_parts(model: nn.Module):
    """The module holding the text tower's parts, and its pool type and eos id.

    CLIP keeps them as its own attributes (`text_pool_type`, `text_eos_id`); CustomTextCLIP keeps a
    TextTransformer in `model.text` (`pool_type`, `eos_id`).
    """
    text = getattr(model, "text", None)
    if text is None:
        return model, model.text_pool_type, getattr(model, "text_eos_id", None)
    if not hasattr(text, "token_embedding"):
        raise UsageError(
            f"text encoder: {type(text).__name__} text towers (e.g. Hugging Face text models) are not "
            "supported; use an architecture with open_clip's own text transformer"
        )
    if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
        raise UsageError(
            "text encoder: text towers with a class token or padding mask (CoCa) are not supported"
        )
    return text, text.pool_type, getattr(text, "eos_id", None)


class TextEncoder(nn.Module):
    """open_clip's text tower only: the vision tower is not kept (memory), the parameter names are
    open_clip's (`token_embedding.weight`, `transformer.resblocks.0...`).

    mode "frozen": no trainable parameters, always eval mode, `encode` caches per caption.
    mode "lora":   LoRA factors on the transformer's attention and MLP weights are the only trainable
                   parameters (vgen.lora).
    mode "full":   every text-tower parameter is trainable.
    """

    def __init__(
        self,
        loaded: LoadedClip,
        mode: str = "frozen",
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        cache_limit: int | None = None,
    ):
        super().__init__()
        import open_clip

        if mode not in MODES:
            raise UsageError(f"text_encoder.mode: expected one of {', '.join(MODES)}, got {mode!r}")
        parts, pool_type, eos_id = _text_parts(loaded.model)
        self.id = loaded.id
        self.weights_sha256 = loaded.weights_sha256
        self.mode = mode
        self.token_embedding = parts.token_embedding
        self.positional_embedding = parts.positional_embedding
        self.transformer = parts.transformer
        self.ln_final = parts.ln_final
        self.text_projection = parts.text_projection
        self.register_buffer("attn_mask", parts.attn_mask, persistent=False)
        self.pool_type, self.eos_id = pool_type, eos_id
        self.context_length = int(self.positional_embedding.shape[0])
        self.width = int(self.transformer.width)
        if self.text_projection is None:
            self.embed_dim = self.width
        elif isinstance(self.text_projection, nn.Linear):
            self.embed_dim = self.text_projection.out_features
        else:
            self.embed_dim = int(self.text_projection.shape[1])
        self.tokenizer = open_clip.get_tokenizer(loaded.open_clip_name, context_length=self.context_length)
        # End-of-text id: the mask is True up to and including it. Not `tokens != pad_id`: the
        # SimpleTokenizer pads with 0, which is also the id of "!".
        self.eot_token_id = getattr(self.tokenizer, "eot_token_id", None)

        # Captions kept by `encode` before the cache is cleared. Default: up to 200k, fewer when
        # their features would pass CACHE_BYTES (ViT-B-32: 2 x 77 x 512 floats a caption, ~6.8k captions).
        row_bytes = 4 * (self.context_length * (2 * self.width + 1) + self.embed_dim)
        self.cache_limit = cache_limit if cache_limit is not None else max(
            1, min(MAX_CACHE_CAPTIONS, CACHE_BYTES // row_bytes)
        )
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.lora_parameter_count = 0
        if mode == "frozen":
            self.requires_grad_(False)
        elif mode == "lora":
            self.lora_parameter_count = add_lora(self.transformer, lora_rank, lora_alpha)
            self.requires_grad_(False)  # embeddings, norms, projection too: only LoRA factors train
            for p in lora_parameters(self):
                p.requires_grad_(True)
        else:
            self.requires_grad_(True)
        self.train(False)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def train(self, mode: bool = True) -> TextEncoder:
        # A frozen encoder stays in eval mode when the model around it is put in training mode,
        # so its features (and the cache) never depend on the caller's mode.
        return super().train(mode and self.mode != "frozen")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[B, context_length] token ids (start marker, BPE tokens, end marker, zero padding)."""
        return self.tokenizer(list(captions)).long()

    def token_count(self, caption: str) -> int | None:
        """Context positions `caption` needs (start and end markers included), None when this
        tokenizer cannot say; more than `context_length` means the encoder sees a truncated caption."""
        encode = getattr(self.tokenizer, "encode", None)
        return None if encode is None else len(encode(caption)) + 2

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True for every position up to and including the end-of-text token."""
        if self.eot_token_id is not None:
            eot = (tokens == self.eot_token_id).int().argmax(dim=-1)
        else:  # open_clip's 'argmax' pooling convention: the end marker has the largest id
            eot = tokens.argmax(dim=-1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return positions[None, :] <= eot[:, None]

    def forward(self, tokens: torch.Tensor) -> TextFeatures:
        """Mirrors open_clip's CLIP.encode_text, keeping the per-token features it discards."""
        from open_clip.transformer import text_global_pool

        cast_dtype = self.transformer.get_cast_dtype()
        length = tokens.shape[1]
        x = self.token_embedding(tokens).to(cast_dtype)  # [B, L, width]
        x = embeddings = x + self.positional_embedding[:length].to(cast_dtype)
        attn_mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.ln_final(x)
        pooled = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                pooled = self.text_projection(pooled)
            else:
                pooled = pooled @ self.text_projection
        return TextFeatures(x, self.token_mask(tokens), pooled, embeddings)

    def encode(self, captions: list[str]) -> TextFeatures:
        """Tokenize and encode. Frozen: without autograd or autocast, from a per-caption cache."""
        if self.mode != "frozen":
            return self(self.tokenize(captions).to(self.device))
        # Autocast off: a cached feature must not depend on whether the caption was first seen in
        # a bf16 training step or an fp32 sampling pass, so it is always computed in the model dtype.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            rows = {c: self._cache[c] for c in dict.fromkeys(captions) if c in self._cache}
            missing = [c for c in dict.fromkeys(captions) if c not in rows]
            for caption in missing:
                # Each caption alone (a batch of one): batched matmuls may round differently per
                # batch composition, and a resumed run must see bitwise the same features.
                f = self(self.tokenize([caption]).to(self.device))
                rows[caption] = tuple(field[0] for field in f)
            if missing:
                if len(self._cache) + len(missing) > self.cache_limit:
                    self._cache.clear()
                self._cache.update((c, rows[c]) for c in missing[: self.cache_limit])
            return TextFeatures(*(torch.stack([rows[c][i] for c in captions]) for i in range(len(TextFeatures._fields))))

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):
        # .to(device / dtype) changes what the features would be; the cache must follow
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_cache()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_text_encoder(cfg: TextEncoderConfig, cache_limit: int | None = None) -> TextEncoder:
    """Load the open_clip model `cfg` names and keep its text tower, set up for `cfg.mode`."""
    return TextEncoder(load_open_clip(cfg), cfg.mode, cfg.lora_rank, cfg.lora_alpha, cache_limit)
