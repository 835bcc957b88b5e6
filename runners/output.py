"""Measure a job's output folder against its caps while the container runs.

The walk is iterative and reads each folder with `os.scandir`, so a hostile tree
(deep, wide or full of links) cannot exhaust the stack or make the agent follow a link
out of the folder. It stops as soon as a cap is passed, so its cost is bounded by the
caps, not by what the job wrote.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

# Scoring programs write flat folders. A deeper tree counts as a violation, well before
# Linux's 4096-byte path limit would stop the walk.
MAX_DEPTH = 256


@dataclass(frozen=True)
class OutputLimits:
    # Bytes of disk that files and folders take (st_blocks), counting each inode once.
    max_bytes: int
    # Files, folders and links of any kind.
    max_entries: int


def check_output(root: str, limits: OutputLimits) -> str | None:
    """Return why `root` breaks `limits`, or None when it is within them.

    A folder that cannot be read counts as a violation, because what it hides cannot
    be measured. An agent running as root can read every folder.
    """
    used_bytes = 0
    entries = 0
    seen_inodes: set[tuple[int, int]] = set()
    pending: list[tuple[str, int]] = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            with os.scandir(folder) as listing:
                children = list(listing)
        except FileNotFoundError:
            # Removed by the job since its parent was listed.
            continue
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                return "the output folder is nested deeper than a Linux path can reach"
            return f"the output folder has a folder the agent cannot read: {exc}"
        for child in children:
            entries += 1
            if entries > limits.max_entries:
                return (
                    f"the output folder has more than {limits.max_entries} files and "
                    "folders, the limit of this site"
                )
            try:
                info = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                if depth + 1 > MAX_DEPTH:
                    return f"the output folder is nested deeper than {MAX_DEPTH} levels"
                pending.append((child.path, depth + 1))
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1:
                if key in seen_inodes:
                    continue
                seen_inodes.add(key)
            used_bytes += info.st_blocks * 512
            if used_bytes > limits.max_bytes:
                return (
                    f"the output folder uses more than {limits.max_bytes} bytes of "
                    "disk, the limit of this site"
                )
    return None
