"""Where a stage writes: one guard for every output directory.

Every stage that writes a directory (`vgen data`, `preprocess`, `train`, `generate`, `evaluate`)
claims it here first:

- a **lock** (`<parent>/.<name>.lock`, an exclusive `flock` holding the owner's pid, host and
  command), so a second process on the same output is refused with who holds it. The kernel drops a
  flock when its process dies, so a lock left by a killed run is stale by construction: the next
  claim takes it over (and says so), as long as the record it left is of this host and its process
  is gone; otherwise (locks that do not reach across hosts) it is refused with the file to delete;
- a **kind check** under that lock: the directory is new, empty, or an earlier output of the same
  kind (its manifest names that kind); only then may `--overwrite` replace it, or `train` resume it.
  A folder of anything else is never deleted or mixed into;
- an **input check**: an output is never one of the stage's inputs, a folder that contains one
  (`--overwrite` would delete what the stage reads) or a folder inside one (it would change it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import yaml

from vgen.atomic import pid_running
from vgen.errors import ArtifactWriteError, BusyError, UsageError, os_error_message

Warn = Callable[[str], None]


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of an output: a hidden sibling of its real path (so that a symlinked alias
    locks the same file), which exists before the output does and is never part of it."""
    target = Path(os.path.realpath(target))
    return target.with_name(f".{target.name}.lock")


def _holder_text(record: dict) -> str:
    who = record.get("command") or "a vgen process"
    return f"{who} (pid {record.get('pid', '?')} on {record.get('host', '?')}, since {record.get('since', '?')})"


def _read_record(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class OutputLock:
    """An exclusive lock on the output `target`, released on exit (also by the kernel, if the
    process dies)."""

    def __init__(self, target: str | os.PathLike, warn: Warn | None = None):
        self.target = Path(target)
        self.path = lock_path(target)
        self.warn = warn or (lambda message: None)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only or full disk, no permission: the output cannot be written
                raise ArtifactWriteError(os_error_message(e, self.target, writing=True), e.errno) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_record(fd)
                os.close(fd)
                raise BusyError(f"{self.target} is in use: {_holder_text(record)} holds {self.path}; wait for it "
                                "to finish (or stop it), or choose another output") from None
            except OSError as e:  # a filesystem without locks (some FUSE mounts): go on unguarded
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.warn(f"{self.path.parent}: this filesystem does not support file locks; a second "
                          f"process writing {self.target} at the same time would not be detected")
                return self
            # A releasing owner unlinks the file before unlocking it: if the name now points elsewhere
            # (or nowhere), the inode we locked is an orphan and the claim starts again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = _read_record(fd)
            if stale:
                self._check_stale(fd, stale)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "command": " ".join(["vgen", *sys.argv[1:]])[:500]}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode("utf-8"))
            self._fd = fd
            return self

    def _check_stale(self, fd: int, record: dict) -> None:
        """The lock was free, yet a record is there: its owner died (the kernel dropped the lock),
        unless the file system's locks do not reach the owner (local-only locks on a network
        mount). Only a record of this host whose process is gone is taken over."""
        this_host = record.get("host") == socket.gethostname()
        if this_host and not pid_running(record.get("pid")):
            self.warn(f"taking over the stale lock {self.path} of {_holder_text(record)}, which is no longer running")
            return
        os.close(fd)
        where = "is still running" if this_host else "ran on another host, which this file system's locks may not reach"
        raise BusyError(f"{self.target} may be in use: {self.path} names {_holder_text(record)}, which {where}; if "
                        f"that process is gone, delete {self.path} and run again")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: see acquire()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def manifest_kind(path: Path) -> str | None:
    """The `kind` a manifest file declares, or None when it is not a readable manifest."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def check_output_dir(out_dir: str | os.PathLike, manifest: str, kind: str, overwrite: bool,
                     option: str = "--out", existing: str = "replace") -> bool:
    """`out_dir` may be written by a stage whose directories hold `manifest` of `kind`: it is new,
    empty, or an earlier output of that kind, which `existing="replace"` replaces only with
    `overwrite` and `existing="resume"` continues. Anything else is refused before any work.
    Returns whether an earlier output is there."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return False
    if not out_dir.is_dir():
        raise UsageError(f"{option} {out_dir}: exists and is not a directory")
    found = out_dir / manifest
    if found.is_file() and manifest_kind(found) == kind:
        if existing == "replace" and not overwrite:
            raise UsageError(f"{option} {out_dir}: holds an earlier {kind}; pass --overwrite to replace it")
        return True
    if any(out_dir.iterdir()):
        what = f"its {manifest} is not a {kind} manifest" if found.is_file() else f"no {manifest}"
        article = "an" if kind[0] in "aeiou" else "a"
        raise UsageError(f"{option} {out_dir}: exists and is not {article} {kind} dir ({what}), so nothing in it "
                         "is replaced or mixed with; choose a new or empty directory")
    return False


def check_not_an_input(out_dir: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]],
                       option: str = "--out") -> None:
    """An output is never an input, a folder holding one (replacing it would delete what the stage
    reads) nor a folder inside one (writing it would change the input). `inputs`: (what, path)."""
    out = Path(out_dir).resolve()
    for what, path in inputs:
        source = Path(path).resolve()
        relation = "is" if out == source else "contains" if out in source.parents else \
            "is inside" if source in out.parents else None
        if relation:
            raise UsageError(f"{option} {out_dir}: {relation} the {what} {path}, which this command reads; "
                             "choose an output outside it")


@contextlib.contextmanager
def claim_output_dir(out_dir: str | os.PathLike, manifest: str, kind: str, overwrite: bool = False, *,
                     inputs: Iterable[tuple[str, str | os.PathLike]] = (), option: str = "--out",
                     existing: str = "replace", warn: Warn | None = None) -> Iterator[Path]:
    """Lock `out_dir`, then check it may be written (check_not_an_input, check_output_dir); yields
    it. The lock is held until the block ends, so the check still holds when the stage renames its
    finished output into place."""
    check_not_an_input(out_dir, inputs, option)
    with OutputLock(out_dir, warn):
        check_output_dir(out_dir, manifest, kind, overwrite, option, existing)
        yield Path(out_dir)


@contextlib.contextmanager
def claim_new_dir(root: str | os.PathLike, stem: str, warn: Warn | None = None) -> Iterator[Path]:
    """Lock and yield a directory name under `root` that no other output has or is claiming:
    `stem`, else `stem-2`, `stem-3`, ... (two processes in the same second get different names)."""
    root = Path(root)
    for k in range(1, 10_000):
        path = root / (stem if k == 1 else f"{stem}-{k}")
        if path.exists():
            continue
        lock = OutputLock(path, warn)
        try:
            lock.acquire()
        except BusyError:
            continue
        if path.exists():  # finished by its claimant between our check and our lock
            lock.release()
            continue
        try:
            yield path
        finally:
            lock.release()
        return
    raise UsageError(f"{root}: no free name for {stem}-N; clean up {root}")
