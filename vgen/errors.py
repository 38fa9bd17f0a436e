"""Errors a user can act on, each carrying the process exit code the CLI returns for it.

The CLI prints `str(error)` (no traceback unless `--debug`), so messages must name the file, the key
and what was expected.
"""


class VgenError(Exception):
    """A failure the user can understand and act on. Exit code 1 (runtime failure)."""

    exit_code = 1


class UsageError(VgenError):
    """Bad arguments, options or input layout. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or `--set` override that does not fit the schema. Exit code 2."""


class ManifestError(UsageError):
    """A manifest that is missing, of an unknown schema, or lacks a required key. Exit code 2."""


class MissingDependencyError(VgenError):
    """A system package or optional file that is needed and not installed. Exit code 1."""


class BusyError(VgenError):
    """An output another process is writing right now (its lock is held). Exit code 1."""


class IntegrityError(VgenError):
    """An artifact whose bytes no longer match what its manifest recorded. Exit code 1."""


class ArtifactWriteError(VgenError):
    """An artifact that could not be written (disk full, read-only, no permission). Exit code 1.
    `errno`: the OS error behind it, so an enclosing artifact can re-name the failure as its own."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


_OS_ADVICE = {
    "ENOSPC": "no space left on the device: free some space, or write to another disk",
    "EDQUOT": "disk quota exceeded: free some space, or write to another disk",
    "EROFS": "the file system is read-only: choose a writable directory",
    "EFBIG": "the file is larger than this file system allows: write to another disk",
    "EACCES": "permission denied: check its permissions (or choose another directory)",
    "EPERM": "operation not permitted: check its permissions (or choose another directory)",
    "ENOENT": "no such file or directory",
    "ENOTDIR": "a part of the path is not a directory",
    "EISDIR": "is a directory",
    "EIO": "input/output error: the disk or network file system failed",
}


def os_error_message(error: OSError, path: object = None, writing: bool = False) -> str:
    """An OSError as a sentence naming the path and what to do about it."""
    import errno

    if path is not None and error.filename is not None and str(error.filename) != str(path):
        target = f"{path} (at {error.filename})"
    else:
        target = path if path is not None else error.filename
    name = errno.errorcode.get(error.errno or 0, "")
    what = _OS_ADVICE.get(name) or (error.strerror or str(error))
    verb = "cannot write" if writing else "cannot access"
    return f"{verb} {target}: {what}" if target is not None else f"{what} ({error})"
