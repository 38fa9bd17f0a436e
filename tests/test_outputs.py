"""The one output guard every stage uses (vgen.outputs) and the atomic writers' temporaries and disk
errors (vgen.atomic): locks with their holder, stale locks, kinds, inputs, unique default names."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hardening import lock_held_elsewhere
from vgen import atomic
from vgen.errors import ArtifactWriteError, BusyError, UsageError
from vgen.manifest import write_manifest
from vgen.outputs import (
    OutputLock,
    check_not_an_input,
    check_output_dir,
    claim_new_dir,
    claim_output_dir,
    lock_path,
)

REPO = Path(__file__).resolve().parents[1]


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    target = tmp_path / "out"
    with lock_held_elsewhere(target) as pid:
        with pytest.raises(BusyError) as info:
            OutputLock(target).acquire()
        message = str(info.value)
        assert f"pid {pid}" in message and str(lock_path(target)) in message and os.uname().nodename in message
    with OutputLock(target):  # released when its holder ended
        assert lock_path(target).exists()
    assert not lock_path(target).exists()  # and ours removes its file


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    target = tmp_path / "out"
    code = f"import os; from vgen.outputs import OutputLock; OutputLock({str(target)!r}).acquire(); os._exit(9)"
    subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert lock_path(target).exists()  # the dead process's record is still there
    warnings = []
    with OutputLock(target, warn=warnings.append):
        pass
    assert len(warnings) == 1 and "stale lock" in warnings[0] and "no longer running" in warnings[0]


def test_a_symlinked_alias_takes_the_same_lock(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "runs" / "x")
    with OutputLock(tmp_path / "runs" / "x"):
        with pytest.raises(BusyError):
            OutputLock(tmp_path / "alias").acquire()


def test_a_record_the_lock_cannot_vouch_for_is_not_taken_over(tmp_path):
    """Locks that do not reach across hosts (local-only locks on a network mount): a record of
    another host, or of a process of this host that still runs, is refused, not taken over."""
    import json
    import socket

    target = tmp_path / "out"
    for record in ({"pid": 1, "host": "gpu-node-7"}, {"pid": os.getppid(), "host": socket.gethostname()}):
        lock_path(target).write_text(json.dumps(record))
        with pytest.raises(BusyError, match=f"delete {lock_path(target)}"):
            OutputLock(target).acquire()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with OutputLock(tmp_path / "out"):
        with pytest.raises(BusyError):
            OutputLock(tmp_path / "out").acquire()


def test_output_dir_kinds(tmp_path):
    check_output_dir(tmp_path / "new", "dataset.yaml", "dataset", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "dataset.yaml", "dataset", overwrite=False)
    earlier = tmp_path / "earlier"
    write_manifest(earlier / "dataset.yaml", "dataset", {})
    with pytest.raises(UsageError, match="--overwrite"):
        check_output_dir(earlier, "dataset.yaml", "dataset", overwrite=False)
    assert check_output_dir(earlier, "dataset.yaml", "dataset", overwrite=True)
    assert check_output_dir(earlier, "dataset.yaml", "dataset", overwrite=False, existing="resume")
    # A file of the right name but another kind, or a folder of anything else: never replaced.
    other = tmp_path / "other"
    write_manifest(other / "dataset.yaml", "run", {})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for folder in (other, foreign):
        with pytest.raises(UsageError, match="is not a dataset dir"):
            check_output_dir(folder, "dataset.yaml", "dataset", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        check_output_dir(tmp_path / "file", "dataset.yaml", "dataset", overwrite=True)


def test_output_is_never_an_input_or_its_ancestor(tmp_path):
    raw = tmp_path / "sand" / "raw"
    raw.mkdir(parents=True)
    for out in (raw, tmp_path / "sand", tmp_path):
        with pytest.raises(UsageError, match="raw folder"):
            check_not_an_input(out, [("raw folder", raw)])
    with pytest.raises(UsageError, match="is inside the raw folder"):
        check_not_an_input(raw / "ds", [("raw folder", raw)])
    check_not_an_input(tmp_path / "sand" / "ds", [("raw folder", raw)])


def test_claimed_dir_is_locked_while_in_use(tmp_path):
    out = tmp_path / "gen"
    with claim_output_dir(out, "generation.yaml", "generation"):
        with pytest.raises(BusyError, match="is in use"):
            with claim_output_dir(out, "generation.yaml", "generation", overwrite=True):
                pass


def test_default_names_are_unique_in_the_same_second(tmp_path):
    with claim_new_dir(tmp_path, "20261201-120000") as first:
        with claim_new_dir(tmp_path, "20261201-120000") as second:
            assert first != second  # the first is only claimed (not created yet), and still not reused
            second.mkdir()
        first.mkdir()
    with claim_new_dir(tmp_path, "20261201-120000") as third:
        assert third.name == "20261201-120000-3"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = atomic._HOST
    stale_dir = tmp_path / f".samples.partial-{dead}-{host}-abc12_34"
    stale_file = tmp_path / f".run.yaml.{dead}-{host}-xyz00000.tmp"
    live = tmp_path / f".other.partial-{os.getpid()}-{host}-def45678"  # a write in progress: kept
    foreign_host = tmp_path / f".samples.partial-{dead}-elsewhere-ghi78900"  # can't tell: kept
    users = tmp_path / f".notes.{dead}-{host}-mine"  # not a name vgen gives: kept
    for path in (stale_dir, live, foreign_host):
        path.mkdir()
    stale_file.write_text("half")
    users.write_text("mine")
    atomic.atomic_write_text(tmp_path / "report.txt", "done")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and foreign_host.exists() and users.exists()
    assert (tmp_path / "report.txt").read_text() == "done"


def test_a_full_or_read_only_disk_names_the_artifact(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ArtifactWriteError, match="no space left") as info:
        with atomic.atomic_directory(tmp_path / "dataset") as tmp:
            (tmp / "a").write_text("x")
            full()
    assert str(tmp_path / "dataset") in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing half-written left behind

    monkeypatch.setattr(atomic.tempfile, "mkdtemp",
                        lambda **kw: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system", kw["dir"])))
    with pytest.raises(ArtifactWriteError, match="read-only") as info:
        with atomic.atomic_directory(tmp_path / "samples"):
            pass
    assert "samples" in str(info.value)


def test_safetensors_io_errors_read_as_os_errors(tmp_path):
    """safetensors reports a failed write as SafetensorError("... (os error N) ..."), not OSError."""
    import torch
    from safetensors.torch import save_file

    try:
        save_file({"w": torch.zeros(2)}, str(tmp_path / "missing-dir" / "w.safetensors"))
    except Exception as e:  # noqa: BLE001
        error = atomic._as_os_error(e)
    assert error is not None and error.errno == errno.ENOENT


def test_a_read_only_place_for_the_lock_names_the_output(tmp_path, monkeypatch):
    import vgen.outputs

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(vgen.outputs.os, "open", read_only)
    with pytest.raises(ArtifactWriteError, match="read-only") as info:
        OutputLock(tmp_path / "gen").acquire()
    assert str(tmp_path / "gen") in str(info.value)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KB file system (tmpfs), where this machine lets the tests mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the monkeypatched tests cover it")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk(tiny_disk, tmp_path, vgen_cli):
    from tests.train_fixtures import make_colour_squares

    raw = make_colour_squares(tmp_path, per_colour=24, size=64)  # 51 distinct images, 157 KB of shards at 32 px: does not fit
    result = vgen_cli("preprocess", raw, "-o", tiny_disk / "ds", "-r", 32, "--workers", 1)
    assert result.exit_code == 1 and "internal error" not in result.stderr
    assert f"cannot write {tiny_disk / 'ds'}: no space left" in result.stderr
    assert list(tiny_disk.iterdir()) == []  # nothing half-written left
