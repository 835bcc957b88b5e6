"""Read a container's scores.json strictly: a flat JSON object of finite numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from fairu.protocol.errors import ErrorCode, JobError

SCORES_FILE = "scores.json"
MAX_SCORES_BYTES = 256 * 1024
MAX_SCORES = 256
SCORE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def read_scores(output_dir: Path) -> dict[str, float]:
    path = output_dir / SCORES_FILE
    if path.is_symlink() or not path.is_file():
        raise JobError(
            ErrorCode.MISSING_SCORES,
            f"the container wrote no /output/{SCORES_FILE}; the scoring program must "
            "write a JSON object of score names to numbers there",
        )
    size = path.stat().st_size
    if size > MAX_SCORES_BYTES:
        raise JobError(
            ErrorCode.BAD_SCORES,
            f"/output/{SCORES_FILE} is {size} bytes; the limit is {MAX_SCORES_BYTES}",
        )
    return parse_scores(path.read_bytes())


def parse_scores(data: bytes) -> dict[str, float]:
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise JobError(
            ErrorCode.BAD_SCORES, f"/output/{SCORES_FILE} is not valid JSON: {exc}"
        ) from None
    if not isinstance(value, dict):
        raise JobError(
            ErrorCode.BAD_SCORES,
            f"/output/{SCORES_FILE} must hold a JSON object, not {type(value).__name__}",
        )
    if len(value) > MAX_SCORES:
        raise JobError(
            ErrorCode.BAD_SCORES,
            f"/output/{SCORES_FILE} has {len(value)} scores; the limit is {MAX_SCORES}",
        )
    scores: dict[str, float] = {}
    for name, number in value.items():
        if not SCORE_NAME.match(name):
            raise JobError(
                ErrorCode.BAD_SCORES,
                f"score name {name[:80]!r} is invalid: use 1 to 64 letters, digits, "
                "'_', '.' or '-'",
            )
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise JobError(
                ErrorCode.BAD_SCORES,
                f"score {name!r} is {type(number).__name__}, not a number",
            )
        try:
            as_float = float(number)
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float):
            raise JobError(ErrorCode.BAD_SCORES, f"score {name!r} is not a finite number")
        scores[name] = as_float
    return scores


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")
