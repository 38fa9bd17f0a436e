"""The GAN benches' shared command line: a config and `--variant` changes to it, each built into a
GAN family on the CPU (bench/gan_speed.py, bench/gan_reads_captions.py)."""

from __future__ import annotations

import argparse

import torch

from vgen.families import build_family
from vgen.families.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--config", default="configs/gan-tiny-cpu.yaml")
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--text", required=True, help="text_encoder.source, e.g. run:demo/text-encoder")
    parser.add_argument("--variant", action="append", default=[], metavar="SETS",
                        help="comma-separated --set changes to the config ('' for the config itself); repeatable")


def build_variants(args: argparse.Namespace, resolution: int) -> list[tuple[str, object, object]]:
    """(name, config, family) per --variant (the config itself when none is given), each family's
    weights initialised from the config's seed."""
    variants = []
    for spec in args.variant or [""]:
        cfg = load_train_config(args.config, [f"text_encoder.source={args.text}", *[s for s in spec.split(",") if s]])
        torch.manual_seed(cfg.train.seed)
        variants.append((spec or "(the config)", cfg, build_family(cfg, resolution, torch.device("cpu"))))
    return variants
