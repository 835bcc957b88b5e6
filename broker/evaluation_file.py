"""Read an organizer's evaluation file (TOML) into an `EvaluationRequest` to sign.

The file contains the fields of `EvaluationRequest` except the ones fairu fills in:
evaluation_id (a fresh one unless given), created_at and expires_at (from
`expires_in`). As in a job file, an input may name a local `file` instead of
`sha256` and `size`. `mu_true_file` may stand for `mu_true`: a JSON list, or an
object with a "mu_true" list such as the example's reference_data/mu_true.json.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from pydantic import ValidationError

from fairu.protocol.errors import ConfigError
from fairu.protocol.evaluation import EvaluationRequest
from fairu.protocol.signing import describe_validation

from .jobfile import complete_inputs, read_toml_file, set_lifetime


def load_evaluation_file(path: Path, evaluation_id: str | None = None) -> EvaluationRequest:
    raw = read_toml_file(path, "evaluation file")

    set_lifetime(raw, "24h")
    if evaluation_id or "evaluation_id" not in raw:
        raw["evaluation_id"] = evaluation_id or f"eval-{uuid.uuid4().hex[:16]}"
    raw["inputs"] = complete_inputs(raw.get("inputs", []), path)
    program = raw.get("scoring_program")
    if isinstance(program, dict):
        program["inputs"] = complete_inputs(program.get("inputs", []), path)
    mu_true_file = raw.pop("mu_true_file", None)
    if mu_true_file is not None:
        if "mu_true" in raw:
            raise ConfigError(
                f"evaluation file {path} sets both mu_true and mu_true_file; keep one"
            )
        raw["mu_true"] = _read_mu_true(path.parent / str(mu_true_file))
    try:
        # Trusted organizer input, so lax mode lets TOML ints stand for floats; the
        # coordinator parses the signed JSON strictly.
        return EvaluationRequest.model_validate(raw, strict=False)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid evaluation file {path}: {describe_validation(exc)}"
        ) from None


def _read_mu_true(path: Path) -> list[float]:
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read mu_true_file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"mu_true_file {path} is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        value = value.get("mu_true")
    if not isinstance(value, list):
        raise ConfigError(
            f"mu_true_file {path} must hold a JSON list of numbers, or an object with "
            "a \"mu_true\" list"
        )
    return value
