"""The `vgen` command line: one thin function per subcommand, parsing arguments and calling a stage.

Exit codes: 0 done, 1 runtime failure, 2 usage or config error. Errors print one clear message on
stderr; `vgen --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vgen import __version__
from vgen.cli_data import data_app
from vgen.cli_understand import caption, classify, search_app
from vgen.errors import VgenError
from vgen.ui import finite_float, print_json

app = typer.Typer(
    name="vgen",
    help="From a folder of captioned images to a trained text-to-image model, samples and a report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"vgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    _state["debug"] = debug


@app.command()
def preprocess(
    raw_dir: Annotated[Path, typer.Argument(help="Raw folder: images + .txt/.caption sidecars or metadata.jsonl/.csv.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to create.")],
    resolution: Annotated[int, typer.Option("--resolution", "-r", help="Output side length R (images are R x R).")] = 64,
    workers: Annotated[int, typer.Option(help="Decoding processes (default: all cores).")] = 0,
    val_fraction: Annotated[float, typer.Option(parser=finite_float, help="Share of images in the validation split, chosen by content hash.")] = 0.05,
    min_size: Annotated[Optional[int], typer.Option(help="Skip images whose shorter side is below this \\[default: R/2].")] = None,
    caption_ext: Annotated[Optional[list[str]], typer.Option(help="Sidecar caption extension, repeatable \\[default: .txt and .caption].")] = None,
    caption_column: Annotated[str, typer.Option(help="Caption column of metadata.jsonl/.csv files.")] = "text",
    allow_empty_captions: Annotated[bool, typer.Option(help="Keep images without any caption.")] = False,
    shard_mb: Annotated[float, typer.Option(parser=finite_float, help="Maximum size of one shard file in MiB.")] = 32.0,
    context_length: Annotated[int, typer.Option(help="Text encoder context, for reporting captions it truncates.")] = 77,
    caption_with: Annotated[Optional[Path], typer.Option(help="A captioner run: images without a caption get the one it writes (counted apart in dataset.yaml) instead of being skipped.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier dataset at --out (never a folder of anything else).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (and nothing else there).")] = False,
) -> None:
    """Clean, centre-crop, resize and shard a raw caption folder into a dataset (dataset.yaml).

    Bad files (corrupt, truncated, empty, not images, decompression bombs, duplicates, no caption)
    are skipped and listed with their reason in skipped.jsonl; they never stop the run.

    Example: vgen preprocess raw -o ds --resolution 32
    """
    import os

    from vgen.data.preprocess import PreprocessOptions
    from vgen.data.preprocess import preprocess as run_preprocess

    options = PreprocessOptions(
        resolution=resolution,
        workers=workers or os.cpu_count() or 1,
        val_fraction=val_fraction,
        min_size=min_size,
        caption_extensions=tuple(caption_ext or ()),
        caption_column=caption_column,
        allow_empty_captions=allow_empty_captions,
        shard_mb=shard_mb,
        context_length=context_length,
        overwrite=overwrite,
    )
    captioner = None
    if caption_with is not None:
        from vgen.understand.captioning import RunCaptioner

        captioner = RunCaptioner(caption_with)
    manifest = run_preprocess(raw_dir, out, options, captioner)
    if json_output:
        print_json({"out_dir": str(out.resolve()), "manifest": str((out / "dataset.yaml").resolve()),
                     "resolution": manifest["resolution"], "counts": manifest["counts"],
                     "splits": {k: manifest["splits"][k] for k in ("train", "val")},
                     "captions": manifest["captions"], "shards": len(manifest["shards"])})


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="Training config YAML (see configs/).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset directory made by `vgen preprocess`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory; an existing run is resumed.")],
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set train.steps=500 (repeatable).")] = None,
    start_over: Annotated[bool, typer.Option("--start-over", help="Train from step 0 in an existing run dir; its checkpoints are moved to RUN/set-aside-N/, not deleted.")] = False,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Start from an earlier run's weights: run:RUN_DIR or run:RUN_DIR@STEP (the config's init.from).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (and nothing else there).")] = False,
) -> None:
    """Train a model of any kind (flow, gan, vae, ar, clip, captioner: the config's `kind`).

    Running the same command again resumes from the newest valid checkpoint. Ctrl-C (or SIGTERM)
    saves a checkpoint and exits. Multi-process: torchrun --nproc_per_node N -m vgen train ...
    Fine-tuning: --init-from run:demo/model starts from that run's weights; a config with
    `adapter: {type: lora}` trains (and saves) only a LoRA adapter on top of it.

    Examples:
      vgen train --config configs/tiny-cpu.yaml --data ds --out runs/tiny --set train.steps=2000
      vgen train -c configs/finetune-lora-cpu.yaml -d rockets --out runs/rocket --init-from run:demo/model
    """
    from vgen.families.config import load_train_config
    from vgen.train.loop import train as run_training

    cfg = load_train_config(config, [*(overrides or ()), *([f"init.from={init_from}"] if init_from else [])])
    summary = run_training(cfg, data, out, start_over=start_over)
    if json_output and summary is not None:
        print_json(summary)


@app.command()
def generate(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run dir of a `vgen train` generator run, any family (holds run.yaml).")],
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts; '-' reads them from stdin, one per line.",
                                                           show_default=False)] = None,
    prompt_file: Annotated[Optional[str], typer.Option("--prompts", help="File of prompts, one per line; '-' for stdin.")] = None,
    n: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Image i of the request (prompt-major order) gets seed S + i.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps \\[default: the run's flow.sample_steps].")] = None,
    guidance: Annotated[Optional[float], typer.Option(parser=finite_float, help="Classifier-free guidance scale; 1 = none \\[default: the run's flow.sample_guidance].")] = None,
    negative: Annotated[str, typer.Option(help="Negative prompt (the unconditioned half of guidance).")] = "",
    sampler: Annotated[Optional[str], typer.Option(help="ODE sampler (flow): euler, or heun (2nd order, 2 network calls a step) \\[default: euler].")] = None,
    temperature: Annotated[Optional[float], typer.Option(parser=finite_float, help="Token sampler (ar): the logits' temperature \\[default: the run's ar.sample_temperature].")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Token sampler (ar): draw from the k likeliest tokens, 0 = all \\[default: the run's ar.sample_top_k].")] = None,
    top_p: Annotated[Optional[float], typer.Option(parser=finite_float, help="Token sampler (ar): draw from the likeliest tokens holding this much probability, 1 = all \\[default: the run's ar.sample_top_p].")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per sampling batch (does not change the pixels: the networks that a batch's shape could change run 16 images at a time).")] = 16,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Generation dir to write \\[default: generations/YYYYmmdd-HHMMSS].")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write grid.png: one row per prompt, labelled.")] = False,
    init_image: Annotated[Optional[Path], typer.Option(help="Edit this image (resized and centre-cropped to the model's size).")] = None,
    strength: Annotated[Optional[float], typer.Option(parser=finite_float, help="With --init-image: noise level to start from, 0 < s <= 1 (SDEdit) \\[default with --mask: 1].")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="With --init-image: white (>= 128) = regenerate, black = keep (same size as the image).")] = None,
    checkpoint: Annotated[str, typer.Option(help="'latest', 'best' (early stopping's) or a step number.")] = "latest",
    adapter_scale: Annotated[Optional[float], typer.Option(parser=finite_float, help="An adapter run: the strength of its LoRA, 0 = the base model, 1 = as trained \\[default: 1].")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier generation at --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (and nothing else there).")] = False,
) -> None:
    """Generate images from a trained generator run (flow, GAN, ...): one PNG per image (prompt, seed and settings in its
    metadata), generation.yaml, and with --grid a contact sheet.

    The same prompt, seed and settings give the same pixels whatever --batch-size. Human output goes
    to stderr; with --json, stdout holds only the summary.

    Examples:
      vgen generate "a cat and a dog" --run demo/model -n 8 --grid
      cat prompts.txt | vgen generate - --run demo/model --json | jq .images
      vgen generate "a cat" --run demo/model --init-image in.png --mask mask.png
    """
    import time

    from vgen.generate import GenerationRequest, read_prompt_file
    from vgen.generate import generate as run_generate
    from vgen.runs import load_run
    from vgen.ui import progress_bar, say, warn

    texts: list[str] = []
    for prompt in prompts or []:
        texts += read_prompt_file("-") if prompt == "-" else [prompt]
    if prompt_file is not None:
        texts += read_prompt_file(prompt_file)
    request = GenerationRequest(prompts=texts, n=n, seed=seed, steps=steps, guidance=guidance,
                                negative_prompt=negative, sampler=sampler, temperature=temperature, top_k=top_k,
                                top_p=top_p, batch_size=batch_size,
                                init_image=init_image, strength=strength, mask=mask, grid=grid)
    start = time.perf_counter()
    gen = load_run(run, checkpoint, device, precision, warn=warn, adapter_scale=adapter_scale)
    request = request.resolved(gen)
    say(f"loaded {run} (step {gen.step}, model {gen.sha256[:10]}) on {gen.device}, {gen.precision}")
    total = len(request.prompts) * request.n
    with progress_bar("generate", total=total) as advance:
        summary = run_generate(gen, request, out, overwrite=overwrite, progress=advance, warn=warn,
                               inputs=[("--prompts file", Path(prompt_file))] if prompt_file not in (None, "-") else [])
    rate = summary["timings"]["images_per_s"]
    say(f"wrote {total} images to {summary['out_dir']} in {time.perf_counter() - start:.1f} s "
        f"({rate or 0:.1f} images/s sampling)", style="green")
    if summary["grid"]:
        say(f"grid: {summary['grid']}")
    if json_output:
        print_json(summary)


@app.command()
def evaluate(
    gen_dir: Annotated[Optional[Path], typer.Argument(help="A generation dir written by `vgen generate` (or use --run with --benchmark).",
                                                      show_default=False)] = None,
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset dir (vgen preprocess): its val split is the reference set.")] = ...,
    out: Annotated[Path, typer.Option("--out", "-o", help="Evaluation dir to write: evaluation.yaml, report.html, images/.")] = ...,
    run: Annotated[Optional[Path], typer.Option("--run", "-r", help="A generator run (any family) to evaluate on --benchmark (generates the images itself).")] = None,
    codec: Annotated[Optional[str], typer.Option(help="A codec to evaluate on the val split instead (run:VAE_RUN, diffusers:DIR): PSNR, SSIM, rFID of its reconstructions.")] = None,
    benchmark: Annotated[Optional[str], typer.Option(help="With --run: the benchmark whose prompts to generate (emoji-scenes).")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Comma-separated: fid,kid,precision-recall,fd-clip,kid-clip,clip-score,compositional,caption-agreement,memorization \\[default: all].")] = None,
    clip: Annotated[Optional[str], typer.Option(help="CLIP for FD/KID[clip] and CLIP score: run:PATH, local-dir:PATH, ... \\[default: the generator's text encoder].")] = None,
    captioner: Annotated[Optional[Path], typer.Option(help="A captioner run for caption-agreement: it captions the generated images, compared with their prompts.")] = None,
    fid_images: Annotated[int, typer.Option(help="With --run: images generated for FID/KID (prompts: the val split's captions).")] = 2000,
    per_relation: Annotated[int, typer.Option(help="With --run: benchmark prompts per relation (training and held-out pairs).")] = 20,
    per_prompt: Annotated[int, typer.Option(help="With --run: images (seeds) per benchmark prompt.")] = 2,
    checkpoints: Annotated[str, typer.Option(help="With --run: all (every kept checkpoint), latest, best (early stopping's), or steps like 1000,2000. The newest gets every metric, earlier ones the benchmark set at one seed per prompt (metric-vs-step plots).")] = "all",
    seed: Annotated[int, typer.Option(help="With --run: image i of each set gets seed S + i.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="With --run: sampler steps \\[default: the run's flow.sample_steps].")] = None,
    guidance: Annotated[Optional[float], typer.Option(parser=finite_float, help="With --run: guidance scale \\[default: the run's flow.sample_guidance].")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="With --run: euler or heun (flow) \\[default: euler].")] = None,
    batch_size: Annotated[int, typer.Option(help="With --run: images per generation batch (does not change the pixels).")] = 100,
    precision: Annotated[str, typer.Option(help="With --run: the generator's precision, auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16.")] = "auto",
    feature_precision: Annotated[str, typer.Option(help="The Inception network's precision: fp32 (standard FID) | bf16 (~2x faster on CPUs with AMX; its own extractor id).")] = "fp32",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier evaluation at --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print evaluation.yaml's headline as JSON on stdout.")] = False,
) -> None:
    """Evaluate generated images: FID/KID (Inception), FD/KID and CLIP score (CLIP), precision/recall,
    compositional accuracy (the emoji-scenes judge) and a memorisation check, into evaluation.yaml
    and a self-contained report.html.

    Each number carries its N, its feature extractor (id + weights sha256) and its reference set; a
    metric whose weights are not installed is reported as unavailable.

    With --codec, the reconstructions of an autoencoder instead: PSNR, SSIM and rFID (FID of the
    reconstructions against the originals) of the val split, and a grid of both.

    Examples:
      vgen evaluate --run demo/model --benchmark emoji-scenes --data demo/dataset --out demo/eval
      vgen evaluate demo/samples --data demo/dataset --out demo/eval-samples --metrics clip-score,compositional
      vgen evaluate --codec run:demo/vae --data demo/dataset-64 --out demo/eval-vae
    """
    from vgen.errors import UsageError
    from vgen.evaluate.evaluation import EvalOptions, parse_metrics
    from vgen.evaluate.runner import BenchmarkSettings, evaluate_benchmark, evaluate_generation_dir
    from vgen.ui import console, metric_table, progress_bar, say

    if sum(x is not None for x in (gen_dir, run, codec)) != 1:
        raise UsageError("give one of GEN_DIR (a `vgen generate` dir), --run RUN --benchmark emoji-scenes, or "
                         "--codec SOURCE (an autoencoder's reconstructions)")
    if run is not None and benchmark is None:
        raise UsageError("--run needs --benchmark emoji-scenes (which prompts to generate)")
    if gen_dir is not None and benchmark is not None:
        raise UsageError("--benchmark generates its own images: use it with --run, not with GEN_DIR")
    if feature_precision not in ("fp32", "bf16"):
        raise UsageError(f"--feature-precision: expected fp32 or bf16, got {feature_precision!r}")
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected at least 1, got {batch_size}")
    options = EvalOptions(metrics=parse_metrics(metrics), clip=clip, feature_precision=feature_precision,
                          device=device, captioner=None if captioner is None else str(captioner))

    def log(message: str) -> None:
        say(message)

    if captioner is not None:  # a wrong run is a usage error now, not an unavailable metric after generating
        from vgen.understand.captioning import RunCaptioner

        RunCaptioner(captioner, device=device)
    if codec is not None:
        from vgen.evaluate.reconstruction import evaluate_codec

        manifest = evaluate_codec(codec, data, out, options, overwrite, progress_bar, log)
    elif run is not None:
        settings = BenchmarkSettings(fid_images=fid_images, per_relation=per_relation, per_prompt=per_prompt,
                                     seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                                     batch_size=batch_size, precision=precision, checkpoints=checkpoints)
        manifest = evaluate_benchmark(run, data, out, options, settings, benchmark, overwrite, progress_bar, log)
    else:
        manifest = evaluate_generation_dir(gen_dir, data, out, options, overwrite, progress_bar, log)
    console.print(metric_table(manifest["metrics"]))
    say(f"wrote {out / 'evaluation.yaml'} in {manifest['timings']['total_s']:.0f} s", style="green")
    say(f"report: {out / 'report.html'}")
    if json_output:
        print_json({"out_dir": str(out.resolve()), "manifest": str((out / "evaluation.yaml").resolve()),
                     "report": str((out / "report.html").resolve()), **manifest["headline"],
                     "caveats": manifest.get("caveats", [])})


# The understanding half: captions, zero-shot classification and search (vgen/cli_understand.py).
app.command()(caption)
app.command()(classify)
app.add_typer(search_app, name="search")


def _fail(message: str, code: int) -> None:
    from rich.markup import escape

    from vgen.ui import console, printable

    console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and turns errors into messages and exit codes."""
    try:
        app(args=argv, prog_name="vgen")
    except VgenError as e:
        if _state["debug"]:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the disk or a path, not a bug: name the path and what to do
        if _state["debug"]:
            raise
        from vgen.errors import os_error_message

        _fail(os_error_message(e), 1)
    except Exception as e:  # an unexpected bug: say so briefly, keep the traceback for --debug
        if _state["debug"]:
            raise
        from vgen.ui import printable

        print(f"internal error: {type(e).__name__}: {printable(e)} (run `vgen --debug ...` for the traceback)",
              file=sys.stderr)
        sys.exit(1)
