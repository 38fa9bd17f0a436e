"""vgen.manifest and vgen.atomic: manifests round-trip, bad manifests are refused with a useful message,
and atomic writes never leave half-written artifacts behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from vgen import __version__
from vgen.atomic import atomic_directory, atomic_path, atomic_write_bytes, atomic_write_text
from vgen.errors import IntegrityError, ManifestError, UsageError
from vgen.manifest import SCHEMA_VERSION, read_manifest, sha256_file, verify_files, write_manifest


def _write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------- manifests


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "sub" / "dataset.yaml"
    body = {
        "resolution": 64,
        "counts": {"kept": 3},
        "note": "héllo ✓",
        "shards": [{"file": "a", "rows": 2}],
    }
    written = write_manifest(path, "dataset", body)
    assert written["schema"] == SCHEMA_VERSION == 1
    assert written["kind"] == "dataset"
    assert written["vgen_version"] == __version__
    assert "created" in written
    read = read_manifest(path, "dataset", required=("resolution", "counts.kept", "shards"))
    assert read == written
    assert read["note"] == "héllo ✓"
    # The header keys come first in the file, body keys follow in their given order.
    assert list(read)[:4] == ["schema", "kind", "vgen_version", "created"]
    assert list(read)[4:] == list(body)


def test_write_manifest_leaves_no_temp_files(tmp_path):
    write_manifest(tmp_path / "run.yaml", "run", {"a": 1})
    write_manifest(tmp_path / "run.yaml", "run", {"a": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
    assert read_manifest(tmp_path / "run.yaml", "run")["a"] == 2


@pytest.mark.parametrize("schema", [2, 0, None, "1"])
def test_unknown_schema_refused(tmp_path, schema):
    path = _write_yaml(tmp_path / "dataset.yaml", {"schema": schema, "kind": "dataset"})
    with pytest.raises(ManifestError) as info:
        read_manifest(path, "dataset")
    message = str(info.value)
    assert str(path) in message
    assert repr(schema) in message  # the version found
    assert f"schema {SCHEMA_VERSION}" in message  # the version this vgen reads


def test_missing_schema_refused(tmp_path):
    path = _write_yaml(tmp_path / "dataset.yaml", {"kind": "dataset"})
    with pytest.raises(ManifestError, match="unsupported manifest schema None"):
        read_manifest(path, "dataset")


def test_wrong_kind_refused(tmp_path):
    path = tmp_path / "run.yaml"
    write_manifest(path, "run", {})
    with pytest.raises(ManifestError) as info:
        read_manifest(path, "dataset")
    message = str(info.value)
    assert str(path) in message
    assert "'dataset'" in message and "'run'" in message


def test_missing_required_dotted_key_named(tmp_path):
    path = tmp_path / "dataset.yaml"
    write_manifest(path, "dataset", {"index": {"file": "index.jsonl"}, "counts": 5})
    read_manifest(path, "dataset", required=("index.file",))  # present: fine
    with pytest.raises(ManifestError) as info:
        read_manifest(path, "dataset", required=("index.file", "index.sha256"))
    assert "'index.sha256'" in str(info.value)
    assert str(path) in str(info.value)
    # A dotted key through a non-mapping value is missing too, not a crash.
    with pytest.raises(ManifestError, match="'counts.kept'"):
        read_manifest(path, "dataset", required=("counts.kept",))
    with pytest.raises(ManifestError, match="'nope'"):
        read_manifest(path, "dataset", required=("nope",))


def test_not_yaml_refused(tmp_path):
    path = tmp_path / "dataset.yaml"
    path.write_text("schema: 1\nkind: [unclosed\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="invalid YAML") as info:
        read_manifest(path, "dataset")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text, type_name", [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("", "NoneType")]
)
def test_non_mapping_refused(tmp_path, text, type_name):
    path = tmp_path / "dataset.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match="mapping") as info:
        read_manifest(path, "dataset")
    assert type_name in str(info.value)


def test_missing_file_and_directory_refused(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "absent.yaml", "dataset")
    with pytest.raises(ManifestError, match="is a directory"):
        read_manifest(tmp_path, "dataset")


def test_manifest_error_is_a_usage_error():
    assert issubclass(ManifestError, UsageError)
    assert ManifestError.exit_code == 2


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "dataset.yaml"
    text = "schema: 1\nkind: dataset\nx: !!python/object/apply:os.system ['true']\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match="invalid YAML"):
        read_manifest(path, "dataset")


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)  # several read chunks plus a partial one
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_verify_files(tmp_path):
    (tmp_path / "shards").mkdir()
    a = tmp_path / "shards" / "a.bin"
    b = tmp_path / "b.bin"
    a.write_bytes(b"aaaa")
    b.write_bytes(b"bbbb")
    entries = [
        {"file": "shards/a.bin", "sha256": sha256_file(a)},
        {"file": "b.bin", "sha256": sha256_file(b)},
    ]
    verify_files(tmp_path, entries, "dataset.yaml")  # untouched: passes

    a.write_bytes(b"aaab")
    with pytest.raises(IntegrityError, match="does not match") as info:
        verify_files(tmp_path, entries, "dataset.yaml")
    assert "a.bin" in str(info.value) and "dataset.yaml" in str(info.value)

    a.write_bytes(b"aaaa")
    b.unlink()
    with pytest.raises(ManifestError, match="missing") as info:
        verify_files(tmp_path, entries, "dataset.yaml")
    assert "b.bin" in str(info.value)


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_text_and_bytes(tmp_path):
    target = tmp_path / "deep" / "dir" / "f.txt"
    atomic_write_text(target, "héllo")
    assert target.read_bytes() == "héllo".encode("utf-8")
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_atomic_path_success_renames_temp(tmp_path):
    target = tmp_path / "model.bin"
    with atomic_path(target) as tmp:
        assert tmp != target
        assert tmp.parent == target.parent
        assert not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_atomic_path_exception_keeps_old_content(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_atomic_path_keyboard_interrupt_cleans_up(tmp_path):
    target = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_success(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        assert tmp.is_dir() and tmp != target
        assert tmp.name.startswith(".out.partial-")
        (tmp / "a.txt").write_text("a")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_exception_keeps_old_content(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .partial- directory left


def test_atomic_directory_exception_without_old(tmp_path):
    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_overwrite_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "deep.txt").write_text("deep")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # old copy removed, no leftovers


def test_atomic_directory_without_overwrite_refuses(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_directory_overwrite_replaces_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("I was a file")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert target.is_dir() and (target / "new.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_artifacts_get_ordinary_modes(tmp_path):
    # tempfile makes 0600 files and 0700 dirs; a report or a dataset must be readable like any file.
    mask = os.umask(0o022)
    try:
        import importlib

        import vgen.atomic

        atomic = importlib.reload(vgen.atomic)  # the modes are read from the umask at import
        atomic.atomic_write_text(tmp_path / "a.yaml", "x: 1\n")
        with atomic.atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))  # safetensors writes 0600
        with atomic.atomic_path(tmp_path / "s.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(mask)
        importlib.reload(vgen.atomic)
    for name in ("a.yaml", "d/f", "d/sub/w.safetensors", "s.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    for name in ("d", "d/sub"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o755, name
