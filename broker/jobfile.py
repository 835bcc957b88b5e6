"""Read an organizer's job file (TOML) into a `JobSpec` ready to sign.

The file holds the fields of `JobSpec` except the ones fairu fills in: job_id
(a fresh one unless given), created_at and expires_at (from `expires_in`). An input
may name a local `file` instead of `sha256` and `size`; both are then computed
from that file, which must be the same one the URL serves.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fairu.protocol.errors import ConfigError
from fairu.protocol.models import JobSpec, utc_now
from fairu.protocol.signing import describe_validation
from fairu.protocol.topology import CPU_CLASS, class_needs_gpu

_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse "90s", "15m", "2h" or "7d"."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(
            f"invalid duration {text!r}: use a number and a unit, as in 90s, 15m, 2h or 7d"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > 10 * 365 * 86400:
        raise ConfigError(f"invalid duration {text!r}: the limit is ten years")
    return timedelta(seconds=seconds)


def read_toml_file(path: Path, kind: str) -> dict[str, Any]:
    """Read an organizer's TOML file. `kind` names the file in errors, as "job file"."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{kind} {path} is not valid TOML: {exc}") from None


def set_lifetime(raw: dict[str, Any], default_expires_in: str) -> None:
    """Replace the file's `expires_in` duration with `created_at` and `expires_at`."""
    expires_in = parse_duration(str(raw.pop("expires_in", default_expires_in)))
    created = utc_now()
    raw["created_at"] = created
    raw["expires_at"] = created + expires_in


def load_job_file(path: Path, job_id: str | None = None) -> JobSpec:
    raw = read_toml_file(path, "job file")

    set_lifetime(raw, "1h")
    raw.setdefault("job_id", job_id or f"job-{uuid.uuid4().hex[:16]}")
    if job_id:
        raw["job_id"] = job_id
    raw["inputs"] = complete_inputs(raw.get("inputs", []), path)
    try:
        # The file is trusted organizer input, so lax mode lets TOML ints stand
        # for floats and dates; the agent parses the signed JSON strictly.
        job = JobSpec.model_validate(raw, strict=False)
    except ValidationError as exc:
        raise ConfigError(f"invalid job file {path}: {describe_validation(exc)}") from None
    _check_resource_class(job, path)
    return job


def _check_resource_class(job: JobSpec, path: Path) -> None:
    """Reject a job whose GPU request contradicts its queue's resource class."""
    gpus = job.resources.gpus
    if job.queue == CPU_CLASS and gpus > 0:
        raise ConfigError(
            f"job file {path} requests gpus = {gpus} in resource class {CPU_CLASS!r}, "
            "whose agents need not have any; set queue to a GPU class such as \"gpu\""
        )
    if class_needs_gpu(job.queue) and gpus == 0:
        raise ConfigError(
            f"job file {path} names GPU resource class {job.queue!r} but requests no "
            f"GPU; set resources.gpus or use queue \"{CPU_CLASS}\""
        )


def complete_inputs(inputs: object, path: Path) -> list[dict[str, Any]]:
    """Fill in sha256 and size of the inputs of the file at `path` that name a `file`."""
    if not isinstance(inputs, list) or not all(isinstance(item, dict) for item in inputs):
        raise ConfigError(f"invalid file {path}: write each input as an [[inputs]] table")
    return [_complete_input(item, path.parent) for item in inputs]


def _complete_input(item: dict[str, Any], base: Path) -> dict[str, Any]:
    item = dict(item)
    local = item.pop("file", None)
    if local is None:
        return item
    file = Path(local).expanduser()
    if not file.is_absolute():
        file = base / file
    try:
        data_size = file.stat().st_size
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1024 * 1024), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read input file {file}: {exc.strerror}") from None
    item.setdefault("sha256", digest.hexdigest())
    item.setdefault("size", data_size)
    return item
