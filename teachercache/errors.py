"""The project's own exceptions.

Every error a user can cause (a wrong path, a damaged shard, a cache from a newer version) is raised as one
of these, with a message that names the file, the problem and, where there is one, the fix. The CLI turns
them into a one-line message and a non-zero exit code; nothing else in the package catches them.
"""

from __future__ import annotations

import os


class TeachercacheError(Exception):
    """Base class of every error teachercache raises on purpose."""


class CacheError(TeachercacheError):
    """A problem with one file of a cache: ``path`` names it, ``problem`` says what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class CacheIncompleteError(CacheError):
    """The cache has no manifest (still being built, or killed before it finished)."""


class CacheFormatError(CacheError):
    """A file is readable but does not follow the format: a missing field, a wrong schema, a bad value."""


class CacheVersionError(CacheFormatError):
    """The cache was written in a format version this reader does not know."""


class CacheCorruptError(CacheError):
    """A file's bytes are damaged: checksum mismatch, truncation, or a stream that does not decode."""


class CachePathError(CacheError):
    """A path named inside a manifest points outside the cache directory (or is not a plain path)."""
