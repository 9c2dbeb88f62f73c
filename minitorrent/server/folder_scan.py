"""Sharing a folder: which files of a tree are shared, and under which relative names.

``main_server.py --add DIR`` shares every regular file under ``DIR`` as
``<DIR's name>/<path inside DIR>`` (``photos/2024/beach.jpg``), each checked
by ``protocol.check_file_name`` like any name. What cannot be shared safely
is skipped with a warning, never fatal for the rest of the tree:

* a symbolic link that leads outside the folder (or nowhere);
* a link to a folder (not followed: it could loop, and what it shows inside
  the folder is shared under its real path anyway);
* anything that is not a regular file (sockets, pipes, devices);
* a name that ``check_file_name`` refuses (a control character, too long).

Empty folders are not shared: the catalog holds files, and a folder is the
files whose names start with it.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from minitorrent.wire.protocol import ProtocolError, check_file_name


@dataclass
class FolderScan:
    """What ``scan_folder`` found: (path on disk, catalog name) pairs and why others were skipped."""

    files: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def scan_folder(root: str | os.PathLike) -> FolderScan:
    """Every regular file under ``root`` with its catalog name, sorted by name (see the module rules)."""
    top = Path(os.path.abspath(root))
    scan = FolderScan()
    real_top = os.path.realpath(top)
    for folder, subfolders, names in os.walk(top, onerror=lambda e: scan.skipped.append(f"{e.filename}: {e.strerror}")):
        relative = Path(folder).relative_to(top)
        for sub in sorted(subfolders):
            if os.path.islink(os.path.join(folder, sub)):
                scan.skipped.append(f"{os.path.join(folder, sub)}: a link to a folder, not followed")
        for name in sorted(names):
            _consider(scan, Path(folder) / name, "/".join((top.name, *relative.parts, name)), real_top)
    scan.files.sort(key=lambda pair: pair[1])
    return scan


def _consider(scan: FolderScan, path: Path, name: str, real_top: str) -> None:
    """Add ``path`` to ``scan.files`` as ``name``, or say in ``scan.skipped`` why not."""
    if path.is_symlink() and not _inside(os.path.realpath(path), real_top):
        scan.skipped.append(f"{path}: a link that leads outside the folder, skipped")
        return
    try:
        mode = path.stat().st_mode
    except OSError as error:
        scan.skipped.append(f"{path}: {error.strerror or error}")
        return
    if not stat.S_ISREG(mode):
        scan.skipped.append(f"{path}: not a regular file, skipped")
        return
    try:
        scan.files.append((path, check_file_name(name)))
    except ProtocolError as error:
        scan.skipped.append(f"{path}: {error}")


def _inside(real_path: str, real_top: str) -> bool:
    return os.path.commonpath([real_path, real_top]) == real_top
