"""`codec: diffusers:DIR_OR_REPO`: a pretrained AutoencoderKL (SD's VAE, sd-vae-ft-mse, SDXL's)
loaded with diffusers (an optional dependency: pip install 'vgen[diffusers]').

DIR_OR_REPO is a local directory holding the VAE's config.json and safetensors weights (or a
pipeline directory with them under vae/), or a Hugging Face repo id, `owner/name[/subfolder]`,
read from the local Hugging Face cache only: vgen never downloads at run time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vgen.codecs.base import Codec
from vgen.errors import MissingDependencyError, UsageError
from vgen.manifest import sha256_file

PREFIX = "diffusers:"
HOW_TO_PROVIDE = ("download it once where there is internet (`huggingface-cli download stabilityai/sd-vae-ft-mse`, "
                  "or save_pretrained of an AutoencoderKL) and copy the folder here, then name it: "
                  "codec: diffusers:/path/to/that/folder")


def _local_repo(repo: str, source: str) -> Path:
    """owner/name[/subfolder] in the Hugging Face cache, without touching the network."""
    from huggingface_hub import snapshot_download

    parts = repo.strip("/").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError, and the hub's validation errors
        from vgen.text.hub import hf_hub_cache_dir

        raise MissingDependencyError(
            f"codec {source}: {repo} is neither a local directory nor in the Hugging Face cache "
            f"({hf_hub_cache_dir()}; {type(e).__name__}); {HOW_TO_PROVIDE}") from None
    return root / subfolder if subfolder else root


def _vae_dir(where: str, source: str) -> Path:
    path = Path(where).expanduser()
    if path.is_dir():
        directory = path
    elif where.count("/") >= 1 and not where.startswith((".", "/", "~")) and not path.exists():
        directory = _local_repo(where, source)
    else:
        raise UsageError(f"codec {source}: {path}: no such directory (expected an AutoencoderKL folder: "
                         f"config.json and diffusion_pytorch_model.safetensors)")
    if not (directory / "config.json").is_file() and (directory / "vae" / "config.json").is_file():
        directory = directory / "vae"  # a whole pipeline (model_index.json): its VAE
    if not (directory / "config.json").is_file():
        raise UsageError(f"codec {source}: {directory}: no config.json (expected an AutoencoderKL folder as "
                         f"save_pretrained writes it, or a pipeline folder with one under vae/)")
    return directory


def weights_sha256(directory: Path, source: str) -> str:
    """One hash of what is loaded: config.json and the safetensors weights, by name and sha256."""
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise UsageError(f"codec {source}: {directory}: no .safetensors weights (only safetensors are read: "
                         f"pickled .bin files can run code when loaded)")
    entries = [(f.name, sha256_file(f)) for f in [directory / "config.json", *weights]]
    return hashlib.sha256(json.dumps(entries).encode("utf-8")).hexdigest()


class DiffusersCodec(Codec):
    def __init__(self, source: str, vae, sha256: str):
        self.source, self.sha256, self.vae = source, sha256, vae
        self.channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, source: str, device) -> DiffusersCodec:
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise MissingDependencyError(f"codec {source}: needs diffusers, an optional dependency: "
                                         "pip install 'vgen[diffusers]'") from None
        directory = _vae_dir(source[len(PREFIX):], source)
        sha = weights_sha256(directory, source)
        try:
            vae = AutoencoderKL.from_pretrained(str(directory), use_safetensors=True, local_files_only=True,
                                                low_cpu_mem_usage=False)  # no `accelerate` needed
        except Exception as e:  # noqa: BLE001 - diffusers raises OSError/ValueError/EnvironmentError here
            raise UsageError(f"codec {source}: diffusers cannot load an AutoencoderKL from {directory}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return cls(source, vae.to(device).eval().requires_grad_(False), sha)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()
