"""`vgen evaluate --codec SOURCE`: how well a codec (a vgen vae run, a diffusers AutoencoderKL)
keeps the dataset's val split: PSNR and SSIM (torchmetrics) of each image against its
reconstruction, and rFID, the FID of the reconstructions against the originals (the number
latent-diffusion and SD report for their autoencoders), with a grid of originals over
reconstructions. The latents are the posterior means, as a latent generator is trained on them."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from vgen.atomic import atomic_directory
from vgen.evaluate.evaluation import (EVALUATION_MANIFEST, INCEPTION_METRICS, EvalOptions, ImageSet, Log,
                                      ProgressFactory, inception_metrics, options_record, write_evaluation)
from vgen.evaluate.summary import headline
from vgen.grid import images_to_float, make_grid, to_uint8
from vgen.outputs import claim_output_dir

RECONSTRUCTION_GRID = "reconstruction-grid.png"
GRID_IMAGES = 12
BATCH = 64


def evaluate_codec(source: str, data_dir: Path, out_dir: Path, options: EvalOptions, overwrite: bool,
                   progress: ProgressFactory, log: Log) -> dict:
    with claim_output_dir(out_dir, EVALUATION_MANIFEST, "evaluation", overwrite, inputs=[("dataset", data_dir)],
                          warn=log):
        return _evaluate_codec(source, Path(data_dir), Path(out_dir), options, progress, log)


@torch.no_grad()
def reconstruct(codec, dataset, device, progress: ProgressFactory) -> tuple[torch.Tensor, torch.Tensor]:
    """(originals, reconstructions), uint8 [N, 3, H, W], of every image of `dataset`."""
    originals = torch.stack([dataset.image(i) for i in range(len(dataset))])
    out = torch.empty_like(originals)
    with progress(f"reconstructing the {dataset.split} split with {codec.source}", len(dataset)) as advance:
        for start in range(0, len(dataset), BATCH):
            x = images_to_float(originals[start:start + BATCH]).to(device)
            out[start:start + BATCH] = to_uint8(codec.decode(codec.encode(x))).cpu()
            advance(len(x))
    return originals, out


def fidelity(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, dict]:
    """PSNR and SSIM of the saved (8-bit) reconstructions, per image in [0, 1], averaged."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = reconstructions.float() / 255, originals.float() / 255
    psnr = torch.tensor([peak_signal_noise_ratio(a[i:i + 1], b[i:i + 1], data_range=1.0) for i in range(len(a))])
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    n = len(a)
    return {"psnr": {"value": float(psnr.mean()), "std": float(psnr.std()) if n > 1 else 0.0, "n": n,
                     "unit": "dB"},
            "ssim": {"value": float(ssim.mean()), "std": float(ssim.std()) if n > 1 else 0.0, "n": n}}


def _evaluate_codec(source: str, data_dir: Path, out_dir: Path, options: EvalOptions, progress: ProgressFactory,
                    log: Log) -> dict:
    from vgen.codecs import load_codec
    from vgen.data.dataset import ImageCaptionDataset, dataset_sha256
    from vgen.distributed import resolve_device

    start = time.perf_counter()
    dataset = ImageCaptionDataset(data_dir, "val")
    device = resolve_device(options.device)
    codec = load_codec(source, 3, device)
    originals, reconstructions = reconstruct(codec, dataset, device, progress)
    captions = [dataset.caption(i, caption_seed=i) for i in range(len(dataset))]
    with atomic_directory(out_dir, overwrite=True) as tmp:
        recon_set = ImageSet("reconstructions", tmp, reconstructions, captions, [], {})
        metrics = fidelity(originals, reconstructions)
        # rFID and its kin: the reconstructions against the val split they came from
        wanted = tuple(m for m in options.metrics if m in INCEPTION_METRICS) or ("fid",)
        metrics.update(inception_metrics(recon_set, data_dir, replace(options, metrics=wanted), progress, log))
        n = min(GRID_IMAGES, len(dataset))
        grid = make_grid(torch.cat([originals[:n], reconstructions[:n]]), columns=n,
                         row_labels=["val images", "reconstructions"])
        grid.save(tmp / RECONSTRUCTION_GRID, format="PNG")
        body = {
            "mode": "reconstruction", "codec": codec.describe(), "run": source, "checkpoint_step": None,
            "dataset": {"path": str(data_dir.resolve()), "sha256": dataset_sha256(data_dir), "split": "val"},
            "generation": {"model": {"kind": "codec", "sha256": codec.sha256 or ""}, "precision": "fp32",
                           "settings": {}, "sets": {"reconstructions": {"n": len(dataset)}}},
            "options": options_record(options), "headline": headline(metrics), "caveats": [], "metrics": metrics,
            "by_step": [], "grid": RECONSTRUCTION_GRID,
            "timings": {"total_s": round(time.perf_counter() - start, 1)},
            "command": " ".join(sys.argv),
        }
        manifest = write_evaluation(tmp, body, [])
        from vgen.evaluate.report import write_report

        write_report(tmp, manifest, {"reconstructions": recon_set}, [], None)
    return manifest
