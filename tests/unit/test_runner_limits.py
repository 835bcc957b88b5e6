"""The runner's seccomp profile derivation and output folder measurement."""

from __future__ import annotations

import os

from fairu.runners.output import MAX_DEPTH, OutputLimits, check_output
from fairu.runners.seccomp import CLONE_NEWUSER, block_user_namespaces

DEFAULT_PROFILE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [
        {
            "names": ["read", "clone", "unshare", "clone3", "write"],
            "action": "SCMP_ACT_ALLOW",
        },
        {"names": ["unshare"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["X"]}},
    ],
}


def rules_for(profile, name):
    return [rule for rule in profile["syscalls"] if name in rule["names"]]


def test_seccomp_keeps_other_syscalls():
    derived = block_user_namespaces(DEFAULT_PROFILE)

    assert derived["defaultAction"] == "SCMP_ACT_ERRNO"
    assert derived["syscalls"][0] == {
        "names": ["read", "write"],
        "action": "SCMP_ACT_ALLOW",
    }
    assert DEFAULT_PROFILE["syscalls"][0]["names"] == [
        "read",
        "clone",
        "unshare",
        "clone3",
        "write",
    ]


def test_seccomp_blocks_newuser_flag():
    derived = block_user_namespaces(DEFAULT_PROFILE)

    unshare = rules_for(derived, "unshare")
    assert [(r["action"], r["args"][0]["valueTwo"]) for r in unshare] == [
        ("SCMP_ACT_ALLOW", 0),
        ("SCMP_ACT_ERRNO", CLONE_NEWUSER),
    ]
    assert unshare[1]["errnoRet"] == 1
    clone = rules_for(derived, "clone")
    assert len(clone) == 4
    assert {r["args"][0]["index"] for r in clone if "includes" in r} == {1}
    assert {r["args"][0]["index"] for r in clone if "excludes" in r} == {0}
    assert rules_for(derived, "clone3") == [
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    ]


def test_output_within_limits(tmp_path):
    (tmp_path / "scores.json").write_text("{}")
    (tmp_path / "sub").mkdir()

    assert (
        check_output(str(tmp_path), OutputLimits(max_bytes=1 << 20, max_entries=10))
        is None
    )


def test_output_counts_hard_links_once(tmp_path):
    (tmp_path / "data").write_bytes(os.urandom(64 * 1024))
    for index in range(20):
        os.link(tmp_path / "data", tmp_path / f"link{index}")

    problem = check_output(
        str(tmp_path), OutputLimits(max_bytes=200 * 1024, max_entries=100)
    )

    assert problem is None


def test_output_over_bytes(tmp_path):
    (tmp_path / "data").write_bytes(os.urandom(256 * 1024))

    problem = check_output(
        str(tmp_path), OutputLimits(max_bytes=100 * 1024, max_entries=100)
    )

    assert problem is not None
    assert "uses more than 102400 bytes of disk" in problem


def test_output_over_entries(tmp_path):
    for index in range(11):
        (tmp_path / f"f{index}").touch()

    problem = check_output(
        str(tmp_path), OutputLimits(max_bytes=1 << 30, max_entries=10)
    )

    assert problem is not None
    assert "more than 10 files and folders" in problem


def test_output_too_deep(tmp_path):
    path = tmp_path
    for _ in range(MAX_DEPTH + 1):
        path = path / "d"
        path.mkdir()

    problem = check_output(
        str(tmp_path), OutputLimits(max_bytes=1 << 30, max_entries=10**6)
    )

    assert problem == f"the output folder is nested deeper than {MAX_DEPTH} levels"


def test_output_does_not_follow_links(tmp_path):
    (tmp_path / "root").symlink_to("/")

    problem = check_output(
        str(tmp_path), OutputLimits(max_bytes=1 << 20, max_entries=10)
    )

    assert problem is None
