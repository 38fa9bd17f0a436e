"""`vgen data`: make raw caption folders and prompt lists from the embedded emoji-scenes data.

Thin, like vgen.cli: parse, call vgen.data.emoji_scenes, print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vgen.ui import finite_float, print_json

data_app = typer.Typer(help="Make raw caption folders and prompt lists (the embedded emoji-scenes data).",
                       no_args_is_help=True)


@data_app.command("emoji-scenes")
def data_emoji_scenes(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create: one PNG + .txt caption per scene.")],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Number of scenes.")] = 20000,
    seed: Annotated[int, typer.Option(help="Scene i is a pure function of (seed, i).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it holds earlier emoji scenes.")] = False,
    objects: Annotated[Optional[str], typer.Option("--objects", help="Comma-separated objects outside the 36 (rocket, star, robot, ghost, lemon, tomato): scenes that teach them to a trained model.")] = None,
    objects_share: Annotated[float, typer.Option("--objects-share", parser=finite_float, help="With --objects: the share of scenes holding a new object; the rest are default scenes (replay).")] = 1.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (and nothing else there).")] = False,
) -> None:
    """Render emoji-scenes training images (64x64, Noto Color Emoji) with their captions.

    Held-out object pairs are never rendered.

    Examples:
      vgen data emoji-scenes raw --count 20000
      vgen data emoji-scenes rockets --count 600 --objects rocket --objects-share 0.5
    """
    from vgen.data.emoji_scenes import write_emoji_scenes
    from vgen.errors import UsageError
    from vgen.ui import progress_bar, say, warn

    new = [n.strip() for n in objects.split(",") if n.strip()] if objects else []
    if objects_share != 1.0 and not new:
        raise UsageError("--objects-share: only with --objects (the share of scenes that hold a new object)")
    with progress_bar("emoji-scenes", total=count) as advance:
        summary = write_emoji_scenes(out_dir, count, seed=seed, overwrite=overwrite, progress=advance, warn=warn,
                                     new_objects=new, new_share=objects_share)
    shares = ", ".join(f"{k} {v}" for k, v in summary["relations"].items())
    say(f"wrote {count} scenes to {out_dir} ({shares})")
    if json_output:
        print_json(summary)


@data_app.command("emoji-scenes-prompts")
def data_emoji_scenes_prompts(
    out_file: Annotated[Path, typer.Argument(help="Text file to write, one prompt per line.")],
    split: Annotated[str, typer.Option(help="train: pairs seen in training; heldout: held-out pairs.")] = "train",
    per_relation: Annotated[int, typer.Option(min=1, help="Prompts per relation (fewer if fewer exist).")] = 50,
    seed: Annotated[int, typer.Option(help="Seed for choosing the prompts.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout (and nothing else there).")] = False,
) -> None:
    """Write emoji-scenes benchmark prompts in the caption grammar.

    Example: vgen data emoji-scenes-prompts heldout.txt --split heldout --per-relation 20
    """
    from vgen.data.emoji_scenes import benchmark_prompts, write_prompts
    from vgen.ui import say

    prompts = benchmark_prompts(split, per_relation, seed=seed)
    write_prompts(out_file, prompts)
    say(f"wrote {len(prompts)} {split} prompts to {out_file}")
    if json_output:
        print_json({"file": str(out_file.resolve()), "split": split, "count": len(prompts), "prompts": prompts})
