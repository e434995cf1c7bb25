"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

#: Paths of streams, whatever they point at: /dev/stdout, /dev/fd/1, /proc/self/fd/1.
_STREAMS = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/")

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write; on success it is flushed to disk
    and renamed onto ``path`` in one step.

    On any exception (KeyboardInterrupt and SIGTERM-as-SystemExit included) the temporary
    file is removed, and the folders made for it if they are still empty, so a failed or
    interrupted write leaves ``path`` and the file system as they were. The
    temporary file lives in ``path``'s folder because a rename is only atomic within one
    filesystem. ``suffix`` keeps an extension that a writer insists on (``np.savez`` adds
    ``.npz`` to a name without it). A ``path`` that is a device or a pipe, such as
    ``/dev/stdout``, is yielded itself: a stream has no old version to keep. A symbolic
    link is replaced, not the file it points to (which may be a DVC cache entry).
    """
    path = Path(path)
    if str(path).startswith(_STREAMS) or (path.exists() and not path.is_file() and not path.is_dir()):
        # A stream (/dev/stdout, a named pipe): written as it is. A rename would replace it,
        # and /dev/stdout of output redirected to a file would replace that file.
        yield path
        return
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
        tmp = Path(name)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty: something else was written there
            folder.rmdir()
