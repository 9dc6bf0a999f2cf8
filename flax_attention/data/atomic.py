"""Whole-or-nothing file writes for everything the training program keeps on disk.

Configs, vocabularies, SentencePiece models, token caches, metrics logs,
translations and word vectors are written to a temporary file in the same
directory and renamed over the target (``os.replace`` is atomic on POSIX and
Windows), so a crash or a full disk mid-write leaves the previous file, never
half a file. Orbax handles the checkpoints themselves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` whose contents replace ``path`` only when the block succeeds.

    Args:
      path: the target; its directory must exist (or is created).
      mode: ``"w"`` (text; ``encoding`` defaults to UTF-8) or ``"wb"``.
      **kwargs: passed to :func:`open`.

    Yields:
      The open temporary file (``np.savez`` and ``json.dump`` accept it).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` (UTF-8), whole or not at all."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data``, whole or not at all."""
    with atomic_open(path, "wb") as f:
        f.write(data)
