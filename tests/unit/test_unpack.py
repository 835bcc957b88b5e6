"""Extraction of tar and zip bundles: what is unpacked and what is rejected."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from fairu.agent import unpack
from fairu.agent.unpack import UnpackLimits, extract_bundle
from fairu.protocol import ErrorCode, JobError

MIB = 1024 * 1024


def tar_bytes(add: Callable[[tarfile.TarFile], None], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as bundle:
        add(bundle)
    return buffer.getvalue()


def add_file(bundle: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    bundle.addfile(info, io.BytesIO(data))


def add_entry(bundle: tarfile.TarFile, name: str, kind: bytes, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    bundle.addfile(info)


def zip_bytes(members: list[tuple[str, bytes, int]]) -> bytes:
    """Build a zip from (name, data, Unix mode with file type) triples."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with warnings.catch_warnings():
                # zipfile warns about a duplicate name, which one case wants.
                warnings.simplefilter("ignore", UserWarning)
                bundle.writestr(info, data)
    return buffer.getvalue()


def unpack_into(tmp_path: Path, data: bytes, kind: str, **limits: float) -> Path:
    archive = tmp_path / f"bundle.{kind}"
    archive.write_bytes(data)
    target = tmp_path / "tree"
    extract_bundle(archive, target, kind, "bundle", UnpackLimits(**limits))
    return target


def test_tar_unpacks_tree_with_inside_links(tmp_path):
    def add(bundle: tarfile.TarFile) -> None:
        add_entry(bundle, "./", tarfile.DIRTYPE)
        add_file(bundle, "./data/values.txt", b"1 2 3")
        add_entry(bundle, "data/alias.txt", tarfile.SYMTYPE, "values.txt")
        add_entry(bundle, "copy.txt", tarfile.LNKTYPE, "data/values.txt")
        info = tarfile.TarInfo("run.sh")
        info.size = 2
        info.mode = 0o4777
        bundle.addfile(info, io.BytesIO(b"ok"))

    tree = unpack_into(tmp_path, tar_bytes(add, "w:gz"), "tar")

    assert (tree / "data" / "values.txt").read_bytes() == b"1 2 3"
    assert (tree / "data" / "alias.txt").read_bytes() == b"1 2 3"
    assert os.readlink(tree / "data" / "alias.txt") == "values.txt"
    assert (tree / "copy.txt").read_bytes() == b"1 2 3"
    assert stat.S_IMODE((tree / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "data").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "data" / "values.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_zip_unpacks_tree_with_inside_link(tmp_path):
    data = zip_bytes(
        [
            ("data/", b"", stat.S_IFDIR | 0o700),
            ("data/values.txt", b"1 2 3", stat.S_IFREG | 0o600),
            ("data/alias.txt", b"values.txt", stat.S_IFLNK | 0o777),
            ("bin/run", b"#!/bin/sh\n", stat.S_IFREG | 0o700),
            ("plain.txt", b"made off Unix", 0),
        ]
    )

    tree = unpack_into(tmp_path, data, "zip")

    assert (tree / "data" / "values.txt").read_bytes() == b"1 2 3"
    assert os.readlink(tree / "data" / "alias.txt") == "values.txt"
    assert (tree / "plain.txt").read_bytes() == b"made off Unix"
    assert stat.S_IMODE((tree / "bin" / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "data" / "values.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tree / "data").stat().st_mode) == 0o755


def zeros_tar(size: int) -> bytes:
    return tar_bytes(lambda bundle: add_file(bundle, "zeros.bin", bytes(size)), "w:gz")


BAD_TARS = [
    pytest.param(
        lambda b: add_file(b, "/etc/cron.d/job"),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="absolute-path",
    ),
    pytest.param(
        lambda b: add_file(b, "data/../../escape"),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="dotdot-escape",
    ),
    pytest.param(
        lambda b: add_file(b, "data/../inside"),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="dotdot-inside",
    ),
    pytest.param(
        lambda b: add_entry(b, "passwd", tarfile.SYMTYPE, "/etc/passwd"),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="symlink-absolute",
    ),
    pytest.param(
        lambda b: add_entry(b, "up", tarfile.SYMTYPE, "../../.."),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="symlink-outside",
    ),
    pytest.param(
        lambda b: (
            add_entry(b, "a", tarfile.SYMTYPE, "b"),
            add_entry(b, "b", tarfile.SYMTYPE, ".."),
        ),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="symlink-chain-outside",
    ),
    pytest.param(
        lambda b: add_entry(b, "shadow", tarfile.LNKTYPE, "/etc/shadow"),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="hardlink-absolute",
    ),
    pytest.param(
        lambda b: add_entry(b, "shadow", tarfile.LNKTYPE, "../etc/shadow"),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="hardlink-outside",
    ),
    pytest.param(
        lambda b: add_entry(b, "console", tarfile.CHRTYPE),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="char-device",
    ),
    pytest.param(
        lambda b: add_entry(b, "disk", tarfile.BLKTYPE),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="block-device",
    ),
    pytest.param(
        lambda b: add_entry(b, "pipe", tarfile.FIFOTYPE),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="fifo",
    ),
    pytest.param(
        lambda b: (add_file(b, "twice", b"first"), add_file(b, "twice", b"second")),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="duplicate-member",
    ),
    pytest.param(
        lambda b: add_file(b, "/".join(["d"] * 200) + "/f"),
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="too-deep",
    ),
    pytest.param(
        lambda b: [add_file(b, f"f{i}") for i in range(11)],
        ErrorCode.INPUT_TOO_LARGE,
        id="too-many-members",
    ),
    pytest.param(
        lambda b: add_file(b, "big", bytes(2 * MIB)),
        ErrorCode.INPUT_TOO_LARGE,
        id="member-too-large",
    ),
    pytest.param(
        lambda b: [add_file(b, f"part{i}", bytes(MIB)) for i in range(4)],
        ErrorCode.INPUT_TOO_LARGE,
        id="total-too-large",
    ),
]


@pytest.mark.parametrize("add, code", BAD_TARS)
def test_tar_rejects_bad_bundle(tmp_path, add, code):
    data = tar_bytes(add)

    with pytest.raises(JobError) as caught:
        unpack_into(
            tmp_path,
            data,
            "tar",
            max_members=10,
            max_member_bytes=MIB,
            max_bytes=3 * MIB,
        )

    assert caught.value.code is code, caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar"]
    assert not (tmp_path.parent / "escape").exists()


def test_tar_rejects_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(unpack, "RATIO_CHECK_FLOOR_BYTES", MIB)
    data = zeros_tar(16 * MIB)
    assert len(data) < 64 * 1024

    with pytest.raises(JobError) as caught:
        unpack_into(tmp_path, data, "tar")

    assert caught.value.code is ErrorCode.INPUT_TOO_LARGE
    assert "decompression bomb" in caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar"]


def test_tar_ratio_ignored_below_floor(tmp_path):
    tree = unpack_into(tmp_path, zeros_tar(MIB), "tar")

    assert (tree / "zeros.bin").stat().st_size == MIB


@pytest.mark.parametrize(
    "data, code",
    [
        pytest.param(
            b"not an archive at all", ErrorCode.INPUT_UNPACK_FAILED, id="garbage"
        ),
        pytest.param(
            tar_bytes(lambda bundle: add_file(bundle, "f", bytes(4096)))[:1024],
            ErrorCode.INPUT_UNPACK_FAILED,
            id="truncated",
        ),
    ],
)
def test_tar_rejects_corrupt_archive(tmp_path, data, code):
    with pytest.raises(JobError) as caught:
        unpack_into(tmp_path, data, "tar")

    assert caught.value.code is code


BAD_ZIPS = [
    pytest.param(
        [("/etc/cron.d/job", b"x", stat.S_IFREG | 0o644)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="absolute-path",
    ),
    pytest.param(
        [("../escape", b"x", stat.S_IFREG | 0o644)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="dotdot",
    ),
    pytest.param(
        [("..\\escape", b"x", stat.S_IFREG | 0o644)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="backslash",
    ),
    pytest.param(
        [("passwd", b"/etc/passwd", stat.S_IFLNK | 0o777)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="symlink-absolute",
    ),
    pytest.param(
        [("up", b"../..", stat.S_IFLNK | 0o777)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="symlink-outside",
    ),
    pytest.param(
        [("console", b"", stat.S_IFCHR | 0o644)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="char-device",
    ),
    pytest.param(
        [("pipe", b"", stat.S_IFIFO | 0o644)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="fifo",
    ),
    pytest.param(
        [("twice", b"a", stat.S_IFREG | 0o644), ("twice", b"b", stat.S_IFREG | 0o644)],
        ErrorCode.INPUT_UNSAFE_MEMBER,
        id="duplicate-member",
    ),
    pytest.param(
        [(f"f{i}", b"x", stat.S_IFREG | 0o644) for i in range(11)],
        ErrorCode.INPUT_TOO_LARGE,
        id="too-many-members",
    ),
    pytest.param(
        [("big", bytes(2 * MIB), stat.S_IFREG | 0o644)],
        ErrorCode.INPUT_TOO_LARGE,
        id="member-too-large",
    ),
]


@pytest.mark.parametrize("members, code", BAD_ZIPS)
def test_zip_rejects_bad_bundle(tmp_path, members, code):
    data = zip_bytes(members)

    with pytest.raises(JobError) as caught:
        unpack_into(tmp_path, data, "zip", max_members=10, max_member_bytes=MIB)

    assert caught.value.code is code, caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.zip"]


def test_zip_rejects_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(unpack, "RATIO_CHECK_FLOOR_BYTES", MIB)
    data = zip_bytes([("zeros.bin", bytes(16 * MIB), stat.S_IFREG | 0o644)])

    with pytest.raises(JobError) as caught:
        unpack_into(tmp_path, data, "zip")

    assert caught.value.code is ErrorCode.INPUT_TOO_LARGE
    assert "decompression bomb" in caught.value.message


def test_zip_rejects_understated_size(tmp_path):
    data = bytearray(zip_bytes([("data.bin", bytes(4096), stat.S_IFREG | 0o644)]))
    # Lower the uncompressed size in the central directory from 4096 to 16 bytes.
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = (16).to_bytes(4, "little")

    with pytest.raises(JobError) as caught:
        unpack_into(tmp_path, bytes(data), "zip")

    # zipfile stops reading at the declared 16 bytes, so the CRC check fails.
    assert caught.value.code is ErrorCode.INPUT_UNPACK_FAILED
    assert "Bad CRC-32" in caught.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.zip"]


def test_zip_rejects_corrupt_archive(tmp_path):
    with pytest.raises(JobError) as caught:
        unpack_into(tmp_path, b"PK\x03\x04 not really a zip", "zip")

    assert caught.value.code is ErrorCode.INPUT_UNPACK_FAILED
