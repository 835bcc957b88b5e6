"""Safe extraction of tar and zip input bundles into a folder that jobs mount read-only.

A bundle is rejected, and nothing of it stays on disk, when any member

- has an absolute name, a `..` component or a name nested deeper than
  `MAX_DEPTH` levels (`input_unsafe_member`);
- is a symbolic or hard link whose target is absolute or resolves outside the tree,
  a device file, a FIFO or a socket (`input_unsafe_member`);
- appears twice (`input_unsafe_member`), because the second copy would silently
  replace the first;
- would take the bundle past one of its `UnpackLimits` (`input_too_large`).

The size checks use the sizes the archive declares, before any byte is written: tar
copies exactly the declared size of each member, and zip reads stop at it. Extracted
files get mode 0644 (0755 with an execute bit) and folders 0755, so that the
container user, which maps to another host UID than the agent, can read them.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from fairu.protocol.errors import ErrorCode, JobError

if TYPE_CHECKING:
    # Imported where they are used, at the first bundle: the agent's config needs
    # this module's limits, and the two modules cost an idle agent about 1 MB.
    import tarfile
    import zipfile

GIB = 1024**3
# os.walk and shutil.rmtree recurse once per level in Python 3.11 and fail with
# RecursionError on a tree 1100 levels deep (tested), so bundles stay far below that.
MAX_DEPTH = 128
# A symbolic link's target is stored as the member's content in a zip archive.
MAX_ZIP_LINK_BYTES = 4096
# Below this many expanded bytes, a high compression ratio does no harm, and tiny text
# files compress well, so the ratio is only checked above it.
RATIO_CHECK_FLOOR_BYTES = 64 * 1024**2
COPY_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class UnpackLimits:
    """Caps on one extracted bundle. A bundle over any of them is rejected."""

    # Sum of the sizes of all regular files once extracted.
    max_bytes: int = 8 * GIB
    # Members of any kind: files, folders and links.
    max_members: int = 100_000
    max_member_bytes: int = 4 * GIB
    # Expanded bytes per byte of the archive file, once past RATIO_CHECK_FLOOR_BYTES.
    max_ratio: float = 100.0


class _Budget:
    """Counts members and expanded bytes against `UnpackLimits`."""

    def __init__(
        self, limits: UnpackLimits, archive_bytes: int, input_name: str
    ) -> None:
        self.limits = limits
        self.archive_bytes = max(1, archive_bytes)
        self.input_name = input_name
        self.members = 0
        self.expanded_bytes = 0

    def add(self, member_name: str, size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            self._reject(f"has more than {self.limits.max_members} members")
        if size > self.limits.max_member_bytes:
            self._reject(
                f"member {_preview(member_name)} is {size} bytes, above the limit of "
                f"{self.limits.max_member_bytes} bytes per member"
            )
        self.expanded_bytes += size
        if self.expanded_bytes > self.limits.max_bytes:
            self._reject(
                f"expands to more than {self.limits.max_bytes} bytes, the limit per "
                "bundle"
            )
        ratio = self.expanded_bytes / self.archive_bytes
        if (
            self.expanded_bytes > RATIO_CHECK_FLOOR_BYTES
            and ratio > self.limits.max_ratio
        ):
            self._reject(
                f"expands {ratio:.0f} times its archive size of {self.archive_bytes} "
                f"bytes, above the limit of {self.limits.max_ratio:g}; a decompression "
                "bomb looks like this"
            )

    def _reject(self, problem: str) -> None:
        raise JobError(
            ErrorCode.INPUT_TOO_LARGE,
            f"input {self.input_name!r}: the bundle {problem}",
        )


def extract_bundle(
    archive: Path, target: Path, kind: str, input_name: str, limits: UnpackLimits
) -> None:
    """Extract `archive` (kind "tar" or "zip") to `target`, which must not exist.

    The tree is built in a staging folder beside `target` and renamed into place
    only when complete, so a rejected or interrupted extraction leaves nothing.
    """
    staging = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
    budget = _Budget(limits, archive.stat().st_size, input_name)
    try:
        staging.mkdir(mode=0o755)
        if kind == "tar":
            _extract_tar(archive, staging, input_name, budget)
        elif kind == "zip":
            _extract_zip(archive, staging, input_name, budget)
        else:
            raise ValueError(f"unknown archive kind {kind!r}")
        _normalize_modes(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- names and links ---------------------------------------------------------------


def _unsafe(input_name: str, problem: str) -> JobError:
    return JobError(ErrorCode.INPUT_UNSAFE_MEMBER, f"input {input_name!r}: {problem}")


def _preview(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:120] + "...")


def _check_member_name(name: str, input_name: str) -> PurePosixPath:
    """Return the member's relative path, or raise for a name that is not safe.

    The path of "./" and "." has no parts, and only a folder may have that name.
    """
    if "\\" in name or "\x00" in name:
        raise _unsafe(
            input_name, f"member {_preview(name)} has a backslash or NUL in its name"
        )
    path = PurePosixPath(name)
    if path.is_absolute():
        raise _unsafe(input_name, f"member {_preview(name)} has an absolute path")
    if ".." in path.parts:
        raise _unsafe(input_name, f"member {_preview(name)} has a '..' component")
    if len(path.parts) > MAX_DEPTH:
        raise _unsafe(
            input_name,
            f"member {_preview(name)} is nested deeper than {MAX_DEPTH} levels",
        )
    return path


def _check_link_target(
    root: Path, member: PurePosixPath, link_target: str, input_name: str
) -> None:
    """Raise unless `link_target`, seen from the member's folder, stays under `root`."""
    if os.path.isabs(link_target):
        raise _unsafe(
            input_name,
            f"link {_preview(str(member))} points to the absolute path "
            f"{_preview(link_target)}",
        )
    resolved = os.path.realpath(root / member.parent / link_target)
    if os.path.commonpath([resolved, os.path.realpath(root)]) != os.path.realpath(root):
        raise _unsafe(
            input_name,
            f"link {_preview(str(member))} points outside the bundle "
            f"({_preview(link_target)})",
        )


# --- tar -------------------------------------------------------------------------


def _extract_tar(
    archive: Path, staging: Path, input_name: str, budget: _Budget
) -> None:
    import tarfile

    seen: set[PurePosixPath] = set()

    def check(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
        path = _check_member_name(member.name, input_name)
        if not path.parts:
            if member.isdir():
                # "./", the root that `tar -C folder -c .` writes first.
                return None
            raise _unsafe(
                input_name, f"member {_preview(member.name)} has an empty name"
            )
        if path in seen and not member.isdir():
            raise _unsafe(input_name, f"member {_preview(member.name)} appears twice")
        seen.add(path)
        if member.issym() or member.islnk():
            _check_link_target(
                staging,
                path if member.issym() else PurePosixPath("."),
                member.linkname,
                input_name,
            )
        # The data filter also rejects device files, FIFOs and links leaving the
        # tree, and clears setuid, setgid and group or other write bits.
        filtered = tarfile.data_filter(member, destination)
        budget.add(member.name, filtered.size if filtered.isreg() else 0)
        return filtered

    try:
        with tarfile.open(archive, "r:*") as bundle:
            bundle.extractall(staging, filter=check)
    except tarfile.FilterError as exc:
        raise _unsafe(input_name, f"unsafe tar member: {exc}") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise JobError(
            ErrorCode.INPUT_UNPACK_FAILED,
            f"input {input_name!r}: cannot unpack the tar archive: {exc}",
        ) from None


# --- zip -------------------------------------------------------------------------


def _extract_zip(
    archive: Path, staging: Path, input_name: str, budget: _Budget
) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            # Check every name and declared size before the first byte is written.
            checked = [_check_zip_member(info, input_name) for info in members]
            if len(set(checked)) != len(checked):
                duplicate = next(p for p in checked if checked.count(p) > 1)
                raise _unsafe(
                    input_name, f"member {_preview(str(duplicate))} appears twice"
                )
            for info in members:
                budget.add(info.filename, 0 if info.is_dir() else info.file_size)
            for info, path in zip(members, checked, strict=True):
                _extract_zip_member(bundle, info, path, staging, input_name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise JobError(
            ErrorCode.INPUT_UNPACK_FAILED,
            f"input {input_name!r}: cannot unpack the zip archive: {exc}",
        ) from None
    except (OSError, EOFError, RuntimeError) as exc:
        # zipfile raises RuntimeError for encrypted members.
        raise JobError(
            ErrorCode.INPUT_UNPACK_FAILED,
            f"input {input_name!r}: cannot unpack the zip archive: {exc}",
        ) from None


def _zip_file_type(info: zipfile.ZipInfo) -> int:
    """Return the member's S_IFMT bits; archives made off Unix store none (0)."""
    return stat.S_IFMT(info.external_attr >> 16)


def _check_zip_member(info: zipfile.ZipInfo, input_name: str) -> PurePosixPath:
    path = _check_member_name(info.filename, input_name)
    if not path.parts:
        raise _unsafe(input_name, f"member {_preview(info.filename)} has an empty name")
    kind = _zip_file_type(info)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        raise _unsafe(
            input_name,
            f"member {_preview(info.filename)} is a device file, FIFO or socket",
        )
    if kind == stat.S_IFLNK and info.file_size > MAX_ZIP_LINK_BYTES:
        raise _unsafe(
            input_name,
            f"link {_preview(info.filename)} has a target over "
            f"{MAX_ZIP_LINK_BYTES} bytes",
        )
    return path


def _extract_zip_member(
    bundle: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    path: PurePosixPath,
    staging: Path,
    input_name: str,
) -> None:
    destination = staging / path
    kind = _zip_file_type(info)
    if info.is_dir() or kind == stat.S_IFDIR:
        destination.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    destination.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if kind == stat.S_IFLNK:
        link_target = bundle.read(info).decode("utf-8", errors="strict")
        _check_link_target(staging, path, link_target, input_name)
        os.symlink(link_target, destination)
        return
    executable = bool((info.external_attr >> 16) & 0o111)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    descriptor = os.open(destination, flags, 0o755 if executable else 0o644)
    with os.fdopen(descriptor, "wb") as output, bundle.open(info) as source:
        _copy_bounded(source, output, info, input_name)


def _copy_bounded(
    source: BinaryIO, output: BinaryIO, info: zipfile.ZipInfo, input_name: str
) -> None:
    # zipfile stops reading at the declared size, and this count makes sure of it.
    written = 0
    while chunk := source.read(COPY_CHUNK_BYTES):
        written += len(chunk)
        if written > info.file_size:
            raise JobError(
                ErrorCode.INPUT_TOO_LARGE,
                f"input {input_name!r}: member {_preview(info.filename)} expands "
                f"past its declared size of {info.file_size} bytes",
            )
        output.write(chunk)


# --- modes ---------------------------------------------------------------------------


def _normalize_modes(root: Path) -> None:
    """Make the tree readable by every user, leaving links alone."""
    for folder, _folders, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                os.chmod(path, 0o644 | (info.st_mode & 0o111))
