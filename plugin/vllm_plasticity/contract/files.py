"""Two file rules every side needs: write atomically, and stay inside a configured directory.

Any process. Atomic here means: a temporary file beside the target, fsynced, renamed over it; a crash at
any instant leaves the old file or the new one, never a mix, and a failure removes the temporary file.

    >>> write_atomically(state_dir / "trainer_state.json", json.dumps(state).encode())
    >>> write_file_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
    >>> with replacing(path) as tmp: os.symlink("gen-b", tmp)   # any writer: one temporary, one rename
    >>> is_inside(root.resolve(), (root / user_path).resolve())
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

TMP_SUFFIX = ".tmp"


def is_inside(path: Path, root: Path, *, allow_root: bool = False) -> bool:
    """Whether resolved `path` lies below resolved `root` (or is it, with allow_root). Callers resolve
    both first (symlinks followed), so a link that points out of `root` is outside."""
    return (allow_root and path == root) or root in path.parents


@contextlib.contextmanager
def replacing(path: Path, suffix: str = TMP_SUFFIX):
    """The one atomic write: yields the path of a temporary file beside `path` (named `path` + TMP_SUFFIX,
    so every temporary of ours is recognisable); once the block has written it and succeeds, the file is
    fsynced and renamed over `path`. On any failure it is removed and `path` is untouched. A symlink
    written there replaces `path` the same way (the caller fsyncs the directory)."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        if not tmp.is_symlink():
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replacing_fd(path: Path, suffix: str = TMP_SUFFIX):
    """`replacing` for writers that want a file descriptor (pwrite, fallocate): yields the open, truncated
    temporary file's fd."""
    with replacing(path, suffix) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            yield fd
        finally:
            os.close(fd)


def write_atomically(path: Path, data: bytes | str, suffix: str = TMP_SUFFIX) -> None:
    """Replace `path` with `data` atomically."""
    view = memoryview(data.encode() if isinstance(data, str) else data)
    with replacing_fd(path, suffix) as fd:
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)


def write_file_atomically(path: Path, write: Callable[[Path], None], suffix: str = TMP_SUFFIX) -> None:
    """Replace `path` atomically with what `write(tmp_path)` writes (for writers that take a path, such
    as safetensors' save_file)."""
    with replacing(path, suffix) as tmp:
        write(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
