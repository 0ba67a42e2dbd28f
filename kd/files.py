"""Small file helpers shared by checkpoints, run directories and `kd eval`."""
from __future__ import annotations

import os


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a partial write: a
    temporary file in the same directory, flushed to disk, then renamed over ``path`` (rename is atomic on POSIX)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
