"""`codec: run:VAE_RUN[@STEP]`: the encoder and decoder of a vgen `vae` run (its EMA weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from vgen import checkpoint as ckpt
from vgen.codecs.base import Codec
from vgen.config import from_dict
from vgen.errors import ManifestError, UsageError, VgenError
from vgen.manifest import read_manifest
from vgen.models.vae import AutoencoderConfig, Decoder, Encoder

PREFIX = "run:"


def split_source(source: str) -> tuple[Path, str | int]:
    """run:DIR[@STEP] -> (DIR, STEP or 'latest')."""
    text = source[len(PREFIX):]
    head, at, step = text.rpartition("@")
    if at and step.isdigit():
        return Path(head).expanduser(), int(step)
    return Path(text).expanduser(), "latest"


class VaeRunCodec(Codec):
    def __init__(self, source: str, cfg: AutoencoderConfig, encoder: Encoder, decoder: Decoder, sha256: str):
        self.source, self.sha256 = source, sha256
        self.channels, self.factor = cfg.z_channels, cfg.factor
        self.encoder, self.decoder = encoder, decoder
        self.quantizer = encoder.quantizer

    @classmethod
    def load(cls, source: str, device) -> VaeRunCodec:
        run_dir, which = split_source(source)
        manifest_path = run_dir / "run.yaml"
        expected = ("expected the --out directory of `vgen train --config configs/vae-tiny-cpu.yaml` "
                    "(a vae run, holding run.yaml and checkpoints/)")
        if not manifest_path.is_file():
            what = "no such directory" if not run_dir.exists() else "not a vgen run (no run.yaml)"
            raise UsageError(f"codec {source}: {run_dir}: {what}; {expected}")
        manifest = read_manifest(manifest_path, "run", required=("train_kind", "config"))
        if manifest["train_kind"] != "vae":
            raise ManifestError(f"codec {source}: {manifest_path} is a {manifest['train_kind']} run; {expected}")
        vae = manifest["config"].get("vae") or {}
        if vae.get("text_conditioned"):
            raise ManifestError(f"codec {source}: {manifest_path}: this vae's decoder reads a caption "
                                "(vae.text_conditioned: true); a codec decodes latents alone: train one with "
                                "vae.text_conditioned false")
        cfg = from_dict(AutoencoderConfig, vae.get("autoencoder") or {}, source=f"{manifest_path}: config.vae.autoencoder")
        try:
            if which == "latest":  # the newest checkpoint, verified: a damaged one is an error, not skipped
                found = ckpt.list_checkpoints(run_dir)
                if not found:
                    raise ManifestError(f"{run_dir}: no checkpoint under {ckpt.CHECKPOINT_DIR}/ (has it trained?)")
                path, state = found[-1], ckpt.read_checkpoint(found[-1])
            else:
                path, state = ckpt.resolve_checkpoint(run_dir, which)
            tensors = ckpt.load_tensors(path, "ema", device)
        except VgenError as e:
            raise type(e)(f"codec {source}: {e}") from None
        encoder, decoder = Encoder(cfg), Decoder(cfg)
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            prefix = name + "."
            try:
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            except RuntimeError as e:
                detail = str(e).strip().splitlines()[0]
                raise ManifestError(f"codec {source}: {path / 'ema.safetensors'} does not fit the autoencoder of "
                                    f"{manifest_path}: {detail}") from None
            module.to(device).eval().requires_grad_(False)
        head = source.rpartition("@")[0] if which != "latest" else source
        return cls(f"{head}@{int(state['step'])}", cfg, encoder, decoder, state["files"]["ema"]["sha256"])

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0].float()  # the posterior mean (the quantized code, with fsq)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).float()
