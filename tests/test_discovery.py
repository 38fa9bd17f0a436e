"""vgen.data.discovery: walking a raw caption folder in a fixed order and pairing captions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vgen.data.discovery import DEFAULT_CAPTION_EXTENSIONS, discover, normalize_caption_extensions
from vgen.errors import UsageError


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def by_path(candidates):
    result = {}
    for c in candidates:
        assert c.path not in result, f"{c.path} yielded twice"
        result[c.path] = c
    return result


def images(candidates):
    return [c.path for c in candidates if c.skip is None]


def skips(candidates):
    return {c.path: c.skip[0] for c in candidates if c.skip is not None}


def test_sorted_deterministic_order_with_recursion(tmp_path):
    # Created in a scrambled order; the walk order must not depend on it.
    for name in ["z.png", "sub/b/2.jpg", "a.png", "sub/a.png", "m.webp", "sub/b/1.jpg", "B.png", "sub/0.bmp"]:
        touch(tmp_path / name)
    first = list(discover(tmp_path))
    second = list(discover(tmp_path))
    expected = ["B.png", "a.png", "m.webp", "z.png", "sub/0.bmp", "sub/a.png", "sub/b/1.jpg", "sub/b/2.jpg"]
    assert images(first) == expected
    assert [c.path for c in first] == [c.path for c in second]
    assert all(c.skip is None for c in first)


def test_uppercase_image_extension_is_an_image(tmp_path):
    touch(tmp_path / "PHOTO.JPG")
    touch(tmp_path / "PHOTO.TXT", b"caption")
    (c,) = discover(tmp_path)
    assert c.path == "PHOTO.JPG" and c.skip is None
    assert c.sidecars == [str(tmp_path / "PHOTO.TXT")]


def test_sidecar_pairing(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "a.txt", b"a txt")
    touch(tmp_path / "a.caption", b"a caption")
    touch(tmp_path / "b.jpg")
    touch(tmp_path / "b.caption", b"b caption")
    touch(tmp_path / "c.png")
    touch(tmp_path / "sub" / "a.png")  # same stem in another folder: does not take ../a.txt
    found = by_path(discover(tmp_path))
    assert set(found) == {"a.png", "b.jpg", "c.png", "sub/a.png"}
    assert found["a.png"].sidecars == [str(tmp_path / "a.caption"), str(tmp_path / "a.txt")]
    assert found["b.jpg"].sidecars == [str(tmp_path / "b.caption")]
    assert found["c.png"].sidecars == []
    assert found["sub/a.png"].sidecars == []
    assert all(c.metadata_captions == [] for c in found.values())


def test_caption_ext_restricts_pairing(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "a.txt", b"t")
    touch(tmp_path / "a.caption", b"c")
    found = by_path(discover(tmp_path, caption_extensions=["txt"]))
    assert found["a.png"].sidecars == [str(tmp_path / "a.txt")]
    # Not a caption extension any more: an unsupported file, still accounted for.
    assert found["a.caption"].skip[0] == "unsupported_file"

    found = by_path(discover(tmp_path, caption_extensions=[".CAPTION"]))
    assert found["a.png"].sidecars == [str(tmp_path / "a.caption")]
    assert found["a.txt"].skip[0] == "unsupported_file"


def test_orphan_captions_reported(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "a.txt", b"a")
    touch(tmp_path / "lonely.txt", b"nobody")
    touch(tmp_path / "lonely.caption", b"nobody")
    touch(tmp_path / "sub" / "other.txt", b"nobody")
    cands = list(discover(tmp_path))
    assert skips(cands) == {
        "lonely.caption": "orphan_caption",
        "lonely.txt": "orphan_caption",
        "sub/other.txt": "orphan_caption",
    }
    assert images(cands) == ["a.png"]


def test_unsupported_extensions_reported(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "notes.md")
    touch(tmp_path / "README")
    touch(tmp_path / "clip.mp4")
    found = by_path(discover(tmp_path))
    assert found["a.png"].skip is None
    for name, ext in [("notes.md", ".md"), ("README", "(none)"), ("clip.mp4", ".mp4")]:
        reason, detail = found[name].skip
        assert reason == "unsupported_file"
        assert ext in detail


def test_hidden_files_and_dirs_ignored(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / ".hidden.png")
    touch(tmp_path / ".DS_Store")
    touch(tmp_path / ".git" / "objects" / "x.png")
    touch(tmp_path / ".out.partial-123" / "b.png")
    touch(tmp_path / "sub" / ".c.png")
    touch(tmp_path / "sub" / "d.png")
    assert [c.path for c in discover(tmp_path)] == ["a.png", "sub/d.png"]


def test_symlink_loop_terminates(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "sub" / "b.png")
    os.symlink(tmp_path / "sub", tmp_path / "sub" / "loop")  # a folder that contains itself
    os.symlink(tmp_path, tmp_path / "sub" / "up")  # and one back to the root
    cands = list(discover(tmp_path))
    assert [c.path for c in cands] == ["a.png", "sub/b.png"]


def test_symlinked_directory_is_followed_once(tmp_path):
    raw = tmp_path / "raw"
    touch(raw / "real" / "a.png")
    os.symlink(raw / "real", raw / "zlink")  # a second way to the same folder
    assert [c.path for c in discover(raw)] == ["real/a.png"]
    # A symlinked folder that is the only way to reach its images is followed.
    touch(tmp_path / "outside" / "o.png")
    os.symlink(tmp_path / "outside", raw / "ext")
    assert [c.path for c in discover(raw)] == ["ext/o.png", "real/a.png"]


def test_broken_symlink_reported(tmp_path):
    touch(tmp_path / "a.png")
    os.symlink(tmp_path / "does-not-exist.png", tmp_path / "b.png")
    found = by_path(discover(tmp_path))
    assert found["a.png"].skip is None
    assert found["b.png"].skip[0] == "broken_symlink"


def test_symlinked_file_is_an_image(tmp_path):
    target = touch(tmp_path / "store" / "real.png")
    os.symlink(target, tmp_path / "link.png")
    found = by_path(discover(tmp_path))
    assert found["link.png"].skip is None
    assert found["store/real.png"].skip is None


def test_metadata_jsonl_at_root(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "sub" / "b.png")
    touch(tmp_path / "c.png")
    rows = [
        {"file_name": "a.png", "text": "root a"},
        {"file_name": "sub/b.png", "text": ["b one", "b two"]},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    found = by_path(discover(tmp_path))
    assert "metadata.jsonl" not in found  # metadata files are not candidates themselves
    assert found["a.png"].metadata_captions == ["root a"]
    assert found["sub/b.png"].metadata_captions == ["b one", "b two"]
    assert found["c.png"].metadata_captions == []


def test_metadata_in_subfolder_relative_to_it(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "sub" / "a.png")
    touch(tmp_path / "sub" / "deeper" / "x.png")
    rows = [{"file_name": "a.png", "text": "sub a"}, {"file_name": "deeper/x.png", "text": "deep x"}]
    (tmp_path / "sub" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    found = by_path(discover(tmp_path))
    assert found["a.png"].metadata_captions == []  # the root's a.png is not the one the row means
    assert found["sub/a.png"].metadata_captions == ["sub a"]
    assert found["sub/deeper/x.png"].metadata_captions == ["deep x"]
    assert not skips(found.values())


def test_metadata_csv_and_sidecars_combine(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "a.txt", b"from sidecar")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,from csv\n", encoding="utf-8")
    (c,) = discover(tmp_path)
    assert c.metadata_captions == ["from csv"]
    assert c.sidecars == [str(tmp_path / "a.txt")]


def test_metadata_row_for_missing_file(tmp_path):
    touch(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "gone.png", "text": "g"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cands = list(discover(tmp_path))
    assert [c.path for c in cands] == ["a.png", "gone.png"]  # missing files come last
    assert skips(cands) == {"gone.png": "missing_file"}


def test_metadata_problems_reported(tmp_path):
    touch(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a"}) + "\n{broken\n", encoding="utf-8"
    )
    found = by_path(discover(tmp_path))
    assert found["sub/metadata.jsonl:2"].skip[0] == "metadata_error"
    assert found["sub/a.png"].metadata_captions == ["a"]


def test_metadata_caption_column(tmp_path):
    touch(tmp_path / "a.png")
    row = {"file_name": "a.png", "prompt": "p"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row), encoding="utf-8")
    with pytest.raises(UsageError, match="--caption-column"):
        list(discover(tmp_path))
    (c,) = discover(tmp_path, caption_column="prompt")
    assert c.metadata_captions == ["p"]


def test_not_a_directory(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        list(discover(tmp_path / "missing"))
    touch(tmp_path / "file.png")
    with pytest.raises(UsageError, match="not a directory"):
        list(discover(tmp_path / "file.png"))


def test_normalize_caption_extensions():
    assert normalize_caption_extensions(None) == DEFAULT_CAPTION_EXTENSIONS == (".txt", ".caption")
    assert normalize_caption_extensions([]) == DEFAULT_CAPTION_EXTENSIONS
    assert normalize_caption_extensions(["TXT", ".Caption", "md"]) == (".txt", ".caption", ".md")
    for bad in (["png"], [".JPG"], ["txt", "webp"]):
        with pytest.raises(UsageError, match="image extension"):
            normalize_caption_extensions(bad)
