"""The command line itself: help, version, `vgen data` commands, exit codes."""

from __future__ import annotations

import subprocess
import sys

from vgen import __version__
from vgen.data.emoji_scenes import is_held_out, parse_caption


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys; from vgen.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'vgen --help imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "preprocess" in result.stdout and "data" in result.stdout


def test_version(vgen_cli):
    result = vgen_cli("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_unknown_option_is_a_usage_error(vgen_cli, tmp_path):
    result = vgen_cli("preprocess", tmp_path, "-o", tmp_path / "x", "--no-such-option")
    assert result.exit_code == 2


def test_data_emoji_scenes_writes_pairs_and_refuses_to_overwrite(vgen_cli, tmp_path):
    out = tmp_path / "raw"
    result = vgen_cli("data", "emoji-scenes", out, "--count", 40, "--seed", 3)
    assert result.exit_code == 0, result.stderr
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*.txt"))) == 40
    again = vgen_cli("data", "emoji-scenes", out, "--count", 40)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert vgen_cli("data", "emoji-scenes", out, "--count", 5, "--overwrite").exit_code == 0
    assert len(list(out.glob("*.png"))) == 5


def test_data_prompts_splits(vgen_cli, tmp_path):
    for split in ("train", "heldout"):
        path = tmp_path / f"{split}.txt"
        result = vgen_cli("data", "emoji-scenes-prompts", path, "--split", split, "--per-relation", 4)
        assert result.exit_code == 0, result.stderr
        prompts = path.read_text().splitlines()
        assert prompts
        for prompt in prompts:
            relation, nouns = parse_caption(prompt)
            if len(nouns) == 2:
                assert is_held_out(*nouns) == (split == "heldout"), prompt
    bad = vgen_cli("data", "emoji-scenes-prompts", tmp_path / "x.txt", "--split", "test")
    assert bad.exit_code == 2 and "split" in bad.stderr


def test_committed_benchmark_prompt_lists_match_the_generator():
    from pathlib import Path

    from vgen.data.emoji_scenes import benchmark_prompts

    root = Path(__file__).resolve().parents[1] / "data" / "emoji-scenes"
    for split in ("train", "heldout"):
        committed = (root / f"prompts-{split}.txt").read_text().splitlines()
        assert committed == benchmark_prompts(split, per_relation=20, seed=0), split
