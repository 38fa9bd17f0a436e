"""Atomic file and directory writes: readers never see a half-written artifact.

Every artifact is written to a temporary sibling and renamed into place (`os.replace` is atomic on
POSIX within one filesystem), so an interrupted run leaves either the old file or the new one.

Temporaries are named `.<name>.partial-<pid>-<host>-*` (directories) and `.<name>.<pid>-<host>-*.tmp`
(files). The next atomic write into the same directory removes those of processes of this host
that are no longer running, so a killed run leaves no lasting litter. (This assumes one pid space
per host name: two containers that share a host name and a folder would not see each other's pids.) A write that fails for lack
of space or on a read-only disk raises `ArtifactWriteError` naming the artifact, not a bare OSError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vgen.errors import ArtifactWriteError, os_error_message

# Errors of the disk being written, wherever in the block they arise.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_HOST = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname())[:40] or "host"
# The exact names this module gives: mkdtemp/mkstemp add 8 characters of [a-z0-9_].
_TEMPORARY = re.compile(r"^\..+\.(?:partial-(\d+)-([A-Za-z0-9_]+)-[a-z0-9_]{8}|(\d+)-([A-Za-z0-9_]+)-[a-z0-9_]{8}\.tmp"
                        r"|old-(\d+)-([A-Za-z0-9_]+)-)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile creates private files (0600) and dirs (0700), and so does safetensors' save_file (it
# writes a new file even over our temporary one); artifacts get the modes open()/mkdir() give, set
# once the writer is done.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def _publish_modes(root: Path) -> None:
    """Give `root` and everything under it the ordinary modes (artifacts hold no executables)."""
    root.chmod(_DIR_MODE if root.is_dir() else _FILE_MODE)
    if root.is_dir():
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                os.chmod(os.path.join(folder, name), _DIR_MODE)
            for name in files:
                os.chmod(os.path.join(folder, name), _FILE_MODE)


def pid_running(pid: object) -> bool:
    """Whether a process of this host has this pid (an owner check for temporaries and locks)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _tag() -> str:
    return f"{os.getpid()}-{_HOST}-"


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries in `directory` left by dead processes of this host (a killed run's
    `.NAME.partial-*`, `.NAME.old-*` and `.NAME.*.tmp`); return what was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match:
            continue
        pid, host = [g for g in match.groups() if g is not None]
        if host != _HOST or pid_running(int(pid)):
            continue
        target = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        removed.append(target)
    return removed


def _as_os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, or the one safetensors' SafetensorError (not an OSError)
    reports a failed write as: "(os error N)" in recent releases, "Os { code: N, ... }" in 0.4."""
    if isinstance(error, OSError):
        return error
    code = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(error))
    if type(error).__name__ == "SafetensorError" and code:
        number = int(code.group(1) or code.group(2))
        return OSError(number, os.strerror(number))
    return None


@contextlib.contextmanager
def _write_errors(path: Path, ours: bool = True) -> Iterator[None]:
    """A full or read-only disk while writing `path` becomes an ArtifactWriteError naming it. With
    `ours` (the block only creates and renames the artifact), so does a permission error; in a
    caller's block one may be about reading an input, and stays as it is."""
    try:
        yield
    except ArtifactWriteError as e:
        # A file of this artifact (a shard inside a dataset being built) failed: the user chose the
        # artifact, not our temporary path to its file, so the artifact is what the message names.
        if ours or e.errno is None:
            raise
        raise ArtifactWriteError(os_error_message(OSError(e.errno, os.strerror(e.errno)), path, writing=True),
                                 e.errno) from e
    except Exception as e:  # noqa: BLE001 - only disk errors are translated; the rest re-raised
        error = _as_os_error(e)
        if error is not None and (error.errno in _WRITE_ERRNOS or (
                error.errno in (errno.EACCES, errno.EPERM) and (ours or error.filename is None))):
            raise ArtifactWriteError(os_error_message(error, path, writing=True), error.errno) from e
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`, on error delete it.

    For writers that want a filename (e.g. `safetensors.save_file`) rather than a file object.
    """
    path = Path(path)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_tag()}", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _write_errors(path, ours=False):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            _publish_modes(tmp_path)
            os.replace(tmp_path, path)
            _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to `path` only when the block succeeds.

    An interrupted run leaves a `.<name>.partial-*` directory that never looks like a finished
    artifact (and that the next write of `path` removes). With `overwrite`, an existing `path` is
    replaced only after the new one is complete; whether it may be replaced at all is the stage's
    decision, made under its lock (vgen.outputs.claim_output_dir).
    """
    path = Path(path)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{_tag()}", dir=path.parent))
    try:
        with _write_errors(path, ours=False):
            yield tmp
            _publish_modes(tmp)
            if path.exists() or path.is_symlink():
                if not overwrite:
                    raise FileExistsError(f"{path} appeared while it was being written")
                old = path.with_name(f".{path.name}.old-{_tag()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
