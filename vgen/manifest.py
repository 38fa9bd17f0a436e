"""YAML manifests: the contract between stages.

Every artifact directory is described by one manifest (`dataset.yaml`, `run.yaml`, ...). A manifest
carries `schema` (the format version), `kind`, the vgen version and a timestamp, is written atomically
and read with `yaml.safe_load` only. Readers refuse unknown schema versions and name the missing key,
so a stage never guesses at another stage's internals.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from vgen import __version__
from vgen.atomic import atomic_write_text
from vgen.errors import IntegrityError, ManifestError, VgenError

SCHEMA_VERSION = 1

_HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large shards do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_yaml(path: str | os.PathLike, what: str, error: type[VgenError]) -> Any:
    """`yaml.safe_load` a file; problems become `error` naming the file (and line, for syntax)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file (expected a {what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read {what}: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise error(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


def write_manifest(path: str | os.PathLike, kind: str, body: Mapping[str, Any]) -> dict:
    """Write `body` as a manifest of `kind` to `path` (atomically) and return what was written."""
    manifest = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "vgen_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **body,
    }
    text = yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True, width=100)
    atomic_write_text(path, text)
    return manifest


def read_manifest(
    path: str | os.PathLike, kind: str, required: Iterable[str] = ()
) -> dict[str, Any]:
    """Read and validate a manifest of `kind`; `required` lists dotted keys that must be present."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path} is a directory; expected a {kind} manifest file")
    data = read_yaml(path, f"{kind} manifest", ManifestError)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: unsupported manifest schema {schema!r}; this vgen ({__version__}) reads "
            f"schema {SCHEMA_VERSION}. Re-create the artifact with this version of vgen."
        )
    if data.get("kind") != kind:
        raise ManifestError(f"{path}: expected a manifest of kind '{kind}', found kind {data.get('kind')!r}")
    for key in required:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ManifestError(f"{path}: missing required key '{key}'")
            node = node[part]
    return data


def resolve_inside(root: str | os.PathLike, relative: Any, where: str) -> Path:
    """`root / relative` for a path read from a manifest at `where`, refused unless it stays inside
    `root`: no absolute path, no `..`, no symlink out. A manifest names files of its own directory
    only, so a hostile one cannot make a stage read (or embed in a report) anything else."""
    root = Path(root)
    if not isinstance(relative, str) or not relative.strip():
        raise ManifestError(f"{where}: expected a relative file path, got {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise ManifestError(f"{where}: {relative!r} is not a path inside {root}; a manifest may only name files "
                            "in its own directory")
    full = root / rel
    real_root, real = root.resolve(), full.resolve()
    if real != real_root and real_root not in real.parents:
        raise ManifestError(f"{where}: {relative!r} resolves to {real}, outside {root} (through a symlink); a "
                            "manifest may only name files in its own directory")
    return full


def verify_files(root: str | os.PathLike, entries: Iterable[Mapping[str, Any]], manifest: str) -> None:
    """Check that each entry's `file` (inside `root`) exists and matches its recorded `sha256`."""
    root = Path(root)
    for entry in entries:
        file = resolve_inside(root, entry.get("file"), manifest)
        if not file.is_file():
            raise ManifestError(f"{manifest}: lists {entry['file']}, which is missing under {root}")
        actual = sha256_file(file)
        if actual != entry.get("sha256"):
            raise IntegrityError(
                f"{file}: sha256 {actual[:12]}… does not match {str(entry.get('sha256'))[:12]}… recorded in "
                f"{manifest}; the file was changed after it was written"
            )
