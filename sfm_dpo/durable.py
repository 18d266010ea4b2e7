"""Files that survive a crash: fsync of a file or folder, and a write that a reader sees whole or not at all.

One place for what the checkpoints' marker, the run status and the reference cache each need: a kill leaves the page
cache to the kernel, but a node crash (power, kernel panic) loses what was not fsynced, renames included.
"""

import logging
import os
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

_link_fallback_logged = False


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder holds its entries' names: fsync it after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, prune: str | None = None, missing_ok: bool = False) -> None:
    """fsync every file and folder under `folder`, then `folder` itself: the files' data and the folders' entries.
    Subfolders whose names start with `prune` are not entered; `missing_ok` skips a file that vanishes meanwhile
    (another process's temporary file)."""
    for root, dirs, files in os.walk(folder):
        if prune:
            dirs[:] = [d for d in dirs if not d.startswith(prune)]
        for name in [*files, *dirs]:
            try:
                fsync_path(Path(root) / name)
            except FileNotFoundError:
                if not missing_ok:
                    raise
    fsync_path(Path(folder))


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """A reader sees the whole file or none of it, also after a crash: written beside, fsynced, renamed, and the
    rename fsynced (the folder). `exclusive`: only if `path` does not exist yet (a hard link instead of a rename),
    returning False when another writer was first; True when written."""
    global _link_fallback_logged
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:  # a filesystem without hard links: open(O_EXCL) is exclusive too, but not atomic
                if not _link_fallback_logged:
                    logger.warning("No hard links in %s (%s): exclusive files are created with O_EXCL, then filled",
                                   path.parent, e)  # fmt: skip
                    _link_fallback_logged = True
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return True
