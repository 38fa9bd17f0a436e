"""vgen.data.captions: decoding, cleaning and metadata files for captions."""

from __future__ import annotations

import json

import pytest

from vgen.data.captions import (
    clean_caption,
    clean_captions,
    decode_caption_bytes,
    read_metadata,
    sidecar_captions,
)
from vgen.errors import UsageError


# ---------------------------------------------------------------- decoding


def test_utf8_decodes_without_note():
    text, note = decode_caption_bytes("a café ☕".encode("utf-8"))
    assert text == "a café ☕"
    assert note is None


def test_utf8_bom_stripped():
    text, note = decode_caption_bytes(b"\xef\xbb\xbfa red cube")
    assert text == "a red cube"
    assert note is None
    captions, note = sidecar_captions(b"\xef\xbb\xbfa red cube\n")
    assert captions == ["a red cube"]
    assert "\ufeff" not in captions[0]


def test_cp1252_decoded_with_note():
    data = "naïve café – “quoted”".encode("cp1252")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    text, note = decode_caption_bytes(data)
    assert text == "naïve café – “quoted”"
    assert note is not None
    assert "not UTF-8" in note and "cp1252" in note
    assert "byte 2" in note  # 0-based offset of the first bad byte (ï)


def test_bytes_undefined_in_cp1252_fall_back_to_latin1():
    data = b"abc\x81def"  # 0x81 is undefined in cp1252 and invalid UTF-8
    text, note = decode_caption_bytes(data)
    assert text == "abc\x81def"
    assert "latin-1" in note


# ---------------------------------------------------------------- cleaning


def test_nfc_normalization():
    decomposed = "cafe\u0301"
    assert len(decomposed) == 5
    cleaned = clean_caption(decomposed)
    assert cleaned == "caf\u00e9"
    assert len(cleaned) == 4


def test_whitespace_collapse():
    assert clean_caption("  a\tred\u00a0\u00a0cube \n on\r\n a  table  ") == "a red cube on a table"
    assert clean_caption(" \t\u00a0\n") == ""


def test_clean_captions_drops_empty_and_repeats_keeping_order():
    texts = ["b  cat", "a dog", "", "   ", "b cat", "a\tdog", "cafe\u0301", "caf\u00e9"]
    assert clean_captions(texts) == ["b cat", "a dog", "caf\u00e9"]


def test_multiline_sidecar():
    data = "a red cube\n\n  \na blue   sphere\r\na red cube\nthird\tone\n".encode("utf-8")
    captions, note = sidecar_captions(data)
    assert captions == ["a red cube", "a blue sphere", "third one"]
    assert note is None


def test_sidecar_non_utf8_note_propagates():
    captions, note = sidecar_captions("crème brûlée\n".encode("cp1252"))
    assert captions == ["crème brûlée"]
    assert note and "cp1252" in note


def test_empty_sidecar():
    assert sidecar_captions(b"") == ([], None)
    assert sidecar_captions(b"\n \n\t\n") == ([], None)


# ---------------------------------------------------------------- metadata.jsonl


def _jsonl(path, rows):
    lines = (r if isinstance(r, str) else json.dumps(r) for r in rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_str_and_list_captions(tmp_path):
    path = _jsonl(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "a.png", "text": "a  red\tcube"},
            {"file_name": "sub\\b.png", "text": ["one", "two"]},
            {"file_name": "a.png", "text": "another"},
            {"file_name": " c.png ", "text": None},
        ],
    )
    meta = read_metadata(path)
    assert meta.path == path
    assert meta.problems == []
    # Raw text is kept here; cleaning happens once for all sources.
    assert meta.captions == {"a.png": ["a  red\tcube", "another"], "sub/b.png": ["one", "two"], "c.png": []}


def test_jsonl_bad_lines_reported_with_line_numbers(tmp_path):
    path = _jsonl(
        tmp_path / "metadata.jsonl",
        [
            {"file_name": "a.png", "text": "ok"},  # line 1
            "{not json",  # line 2
            "",  # line 3: blank, ignored
            "[1, 2]",  # line 4: not an object
            {"text": "no file"},  # line 5
            {"file_name": "d.png", "text": 5},  # line 6: bad caption type
            {"file_name": "e.png", "text": ["x", 1]},  # line 7: list with a non-string
            {"file_name": "f.png", "text": "fine"},  # line 8
        ],
    )
    meta = read_metadata(path)
    assert meta.captions == {"a.png": ["ok"], "f.png": ["fine"]}
    lines = [line for line, _ in meta.problems]
    assert lines == [2, 4, 5, 6, 7]
    messages = dict(meta.problems)
    assert "invalid JSON" in messages[2]
    assert "JSON object" in messages[4]
    assert "file_name" in messages[5]
    assert "'text'" in messages[6]


def test_jsonl_missing_caption_column(tmp_path):
    path = _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "caption": "x", "score": 1}])
    with pytest.raises(UsageError) as info:
        read_metadata(path)
    message = str(info.value)
    assert str(path) in message
    assert "'text'" in message
    assert "file_name, caption, score" in message
    assert "--caption-column" in message
    # Choosing the right column works.
    assert read_metadata(path, caption_column="caption").captions == {"a.png": ["x"]}


def test_jsonl_bad_first_line_does_not_decide_columns(tmp_path):
    path = _jsonl(tmp_path / "metadata.jsonl", ["garbage", {"file_name": "a.png", "text": "x"}])
    meta = read_metadata(path)
    assert meta.captions == {"a.png": ["x"]}
    assert [line for line, _ in meta.problems] == [1]


def test_jsonl_with_bom(tmp_path):
    path = tmp_path / "metadata.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"file_name": "a.png", "text": "x"}).encode() + b"\n")
    assert read_metadata(path).captions == {"a.png": ["x"]}


# ---------------------------------------------------------------- metadata.csv


def test_csv_several_rows_per_file(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text(
        'file_name,text\na.png,first\nb.png,"with, comma"\na.png,second\n,orphan\n', encoding="utf-8"
    )
    meta = read_metadata(path)
    assert meta.captions == {"a.png": ["first", "second"], "b.png": ["with, comma"]}
    assert meta.problems == [(5, "row has no 'file_name'")]


def test_csv_custom_column(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("file_name,prompt\na.png,hello\n", encoding="utf-8")
    with pytest.raises(UsageError, match="--caption-column"):
        read_metadata(path)
    assert read_metadata(path, caption_column="prompt").captions == {"a.png": ["hello"]}


def test_csv_without_file_name(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("image,text\na.png,hello\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        read_metadata(path)
    assert "'file_name'" in str(info.value)
    assert "image, text" in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_metadata_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read metadata"):
        read_metadata(tmp_path / "metadata.jsonl")
