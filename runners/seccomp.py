"""A seccomp profile for job containers: podman's default, minus new user namespaces.

The default profile of containers-common 0.50 (Debian 12, podman 4.3.1) allows
`unshare` and `clone` with any flags. In a user namespace of its own, a job is root
with every capability over the mount namespaces it creates. It can then mount a tmpfs
that no size option, rlimit or (rootless on cgroup v1) memory limit bounds. Tested:
`unshare -rm sh -c 'mount -t tmpfs x /tmp'` succeeds as uid 1000 in
`localhost/fairu-python:1` under the default profile.
The derived profile makes `unshare` and `clone` fail with EPERM when their flags
include CLONE_NEWUSER, and `clone3`, whose flags seccomp cannot read, fail with
ENOSYS, so that the C library falls back to `clone`.
"""

from __future__ import annotations

import copy
import errno
from typing import Any

CLONE_NEWUSER = 0x10000000
# On s390 the flags are clone's second argument; on every other architecture the first.
S390_ARCHES = ["s390", "s390x"]
NAMESPACE_SYSCALLS = frozenset({"unshare", "clone", "clone3"})


def block_user_namespaces(profile: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the Docker-format seccomp `profile` without user namespaces.

    Raise ValueError when `profile` has no `syscalls` list.
    """
    derived = copy.deepcopy(profile)
    rules = derived.get("syscalls")
    if not isinstance(rules, list):
        raise ValueError("the seccomp profile has no 'syscalls' list")
    other_rules = []
    for rule in rules:
        names = [
            name for name in rule.get("names", []) if name not in NAMESPACE_SYSCALLS
        ]
        if names:
            other_rules.append({**rule, "names": names})
    derived["syscalls"] = other_rules + _namespace_rules()
    return derived


def _flags_rule(
    name: str, index: int, action: str, with_newuser: bool
) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "names": [name],
        "action": action,
        "args": [
            {
                "index": index,
                "value": CLONE_NEWUSER,
                "valueTwo": CLONE_NEWUSER if with_newuser else 0,
                "op": "SCMP_CMP_MASKED_EQ",
            }
        ],
    }
    if action == "SCMP_ACT_ERRNO":
        rule["errnoRet"] = errno.EPERM
    return rule


def _namespace_rules() -> list[dict[str, Any]]:
    rules = []
    for with_newuser, action in ((False, "SCMP_ACT_ALLOW"), (True, "SCMP_ACT_ERRNO")):
        rules.append(_flags_rule("unshare", 0, action, with_newuser))
        clone_rule = _flags_rule("clone", 0, action, with_newuser)
        clone_rule["excludes"] = {"arches": S390_ARCHES}
        rules.append(clone_rule)
        s390_rule = _flags_rule("clone", 1, action, with_newuser)
        s390_rule["includes"] = {"arches": S390_ARCHES}
        rules.append(s390_rule)
    rules.append(
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS}
    )
    return rules
