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
