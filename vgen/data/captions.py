"""Caption text: decoding sidecar bytes, cleaning, and imagefolder metadata files.

Captions reach the model through a tokenizer that is sensitive to Unicode form and whitespace, so
every caption is NFC-normalized and has its whitespace collapsed here, once, for every source.
Terminal control characters (ANSI escape sequences, other C0/C1 controls) are removed too: they
carry no meaning for a text encoder, and a caption is echoed in terminals and reports.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from vgen.errors import UsageError

# Tried in order; cp1252 covers the captions editors on Windows write, latin-1 decodes any byte.
_FALLBACK_ENCODINGS = ("cp1252", "latin-1")


def decode_caption_bytes(data: bytes) -> tuple[str, str | None]:
    """Decode a caption file; return (text, note), the note saying when it was not UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        first_error = f"invalid UTF-8 at byte {e.start}"
    for encoding in _FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding), f"caption is not UTF-8 ({first_error}); decoded as {encoding}"
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")


# ECMA-48 escape sequences: CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \\), and the
# two-byte ESC sequences; then any other C0/C1 control character except the whitespace ones (tab,
# newline, vertical tab, form feed, CR), which are collapsed like other whitespace.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def strip_control_characters(text: str) -> tuple[str, int]:
    """`text` without escape sequences and control characters (each other control becomes a space,
    so two words it separated stay apart), and how many were removed."""
    text, sequences = _ESCAPE_SEQUENCE.subn("", text)
    text, controls = _CONTROL.subn(" ", text)
    return text, sequences + controls


def clean_caption(text: str) -> str:
    """Remove control characters, NFC-normalize and collapse runs of whitespace (incl. tabs, NBSP)
    into single spaces."""
    return " ".join(unicodedata.normalize("NFC", strip_control_characters(text)[0]).split())


def clean_captions(texts: list[str]) -> list[str]:
    """Clean each caption and drop empty ones and repeats, keeping the first occurrence's order."""
    seen: dict[str, None] = {}
    for text in texts:
        cleaned = clean_caption(text)
        if cleaned:
            seen.setdefault(cleaned, None)
    return list(seen)


def sidecar_captions(data: bytes) -> tuple[list[str], str | None]:
    """Captions of one sidecar file: each non-empty line is one caption of the same image."""
    text, note = decode_caption_bytes(data)
    return clean_captions(text.splitlines()), note


@dataclass
class MetadataFile:
    """Captions read from an imagefolder `metadata.jsonl` / `metadata.csv` (diffusers' layout).

    `captions` maps a `file_name` (relative to the metadata file's folder, POSIX separators) to the
    captions given for it; `problems` lists (line number, message) of rows that could not be used.
    """

    path: Path
    captions: dict[str, list[str]] = field(default_factory=dict)
    problems: list[tuple[int, str]] = field(default_factory=list)

    def _add(self, line: int, row: dict, column: str) -> None:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            self.problems.append((line, "row has no 'file_name'"))
            return
        value = row.get(column)
        if value is None:
            texts: list[str] = []
        elif isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            texts = value
        else:
            self.problems.append((line, f"'{column}' must be a string or a list of strings, got {value!r}"))
            return
        key = Path(name.strip().replace("\\", "/")).as_posix()
        self.captions.setdefault(key, []).extend(texts)


def _missing_column(path: Path, column: str, columns: list[str]) -> UsageError:
    return UsageError(
        f"{path}: no caption column '{column}' (columns: {', '.join(columns) or 'none'}); "
        "choose the caption column with --caption-column NAME"
    )


def read_metadata(path: Path, caption_column: str = "text") -> MetadataFile:
    """Parse a metadata.jsonl or metadata.csv; a missing `file_name`/caption column is a usage error."""
    meta = MetadataFile(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read metadata file: {e}") from None
    text, _ = decode_caption_bytes(raw)
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = list(reader.fieldnames or [])
        if "file_name" not in columns:
            raise UsageError(f"{path}: no 'file_name' column (columns: {', '.join(columns) or 'none'})")
        if caption_column not in columns:
            raise _missing_column(path, caption_column, columns)
        for line, row in enumerate(reader, start=2):
            meta._add(line, row, caption_column)
        return meta
    checked_columns = False
    for line, row_text in enumerate(text.splitlines(), start=1):
        if not row_text.strip():
            continue
        try:
            row = json.loads(row_text)
        except json.JSONDecodeError as e:
            meta.problems.append((line, f"invalid JSON: {e.msg}"))
            continue
        if not isinstance(row, dict):
            meta.problems.append((line, "expected a JSON object"))
            continue
        if not checked_columns:  # the first row decides: a wrong column name is a usage error
            if caption_column not in row:
                raise _missing_column(path, caption_column, list(row))
            checked_columns = True
        meta._add(line, row, caption_column)
    return meta
