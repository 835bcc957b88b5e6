"""Ed25519 keys, signed envelopes, and strict decoding of signed payloads.

The order of checks on a received message is fixed: size, envelope shape, key,
signature over the exact payload bytes, and only then JSON decoding of the payload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, ErrorCode, RejectedError
from .models import PROTOCOL_VERSION, Envelope

ModelT = TypeVar("ModelT", bound=BaseModel)

# A job envelope with its certificate is a few kilobytes; inputs travel by URL.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_text(key: Ed25519PublicKey) -> str:
    """Return the raw 32-byte public key as base64, the form site configs use."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_public_key_text(text: str) -> Ed25519PublicKey:
    if "PRIVATE KEY" in text:
        # The message must not quote the text, because it would show key material.
        raise ConfigError(
            "expected an Ed25519 public key but got a PEM private key; use the .pub "
            "file next to it (root.pub or signing.pub), and keep private keys off sites"
        )
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            f"invalid Ed25519 public key {text[:60]!r}: expected the base64 of 32 raw "
            "bytes, as `fairu-admin keys init-root` or `keys init` prints it"
        ) from exc


def key_id_for(key: Ed25519PublicKey) -> str:
    """Derive a stable key id from the public key, so ids cannot be forged apart from keys."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def agent_id_for(site: str, key: Ed25519PublicKey) -> str:
    """Derive an agent id from its site and identity key, so no agent can claim another's."""
    return f"{site}-{key_id_for(key).split(':', 1)[1][:12]}"


def write_private_key(
    path: Path, key: Ed25519PrivateKey, passphrase: bytes | None = None
) -> None:
    """Write a PKCS#8 PEM file with mode 0600; refuse to overwrite an existing key."""
    encryption: serialization.KeySerializationEncryption
    if passphrase:
        encryption = serialization.BestAvailableEncryption(passphrase)
    else:
        encryption = serialization.NoEncryption()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(
            f"key file {path} already exists; move it away or choose another folder"
        ) from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"invalid private key file {path}: {exc}; expected a PEM file written by "
            "`fairu-admin keys init` (and its passphrase, if it has one)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {path} is not an Ed25519 key")
    return key


def sign_payload(
    payload: bytes, key: Ed25519PrivateKey, key_id: str | None = None
) -> Envelope:
    if key_id is None:
        key_id = key_id_for(key.public_key())
    return Envelope(
        key_id=key_id,
        signature=base64.b64encode(key.sign(payload)).decode("ascii"),
        payload=base64.b64encode(payload).decode("ascii"),
    )


def sign_model(model: BaseModel, key: Ed25519PrivateKey, key_id: str | None = None) -> bytes:
    """Serialize `model`, sign it, and return the envelope as JSON bytes."""
    envelope = sign_payload(model.model_dump_json().encode(), key, key_id)
    return envelope.model_dump_json(exclude_none=True).encode()


def decode_envelope(
    body: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Envelope:
    if len(body) > max_bytes:
        raise RejectedError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"message of {len(body)} bytes exceeds the limit of {max_bytes} bytes",
        )
    return _parse_strict(
        body, Envelope, "envelope", ErrorCode.BAD_ENVELOPE, version_required=False
    )


def verify_envelope(
    envelope: Envelope, trusted_keys: Mapping[str, Ed25519PublicKey]
) -> bytes:
    """Return the payload bytes once the signature checks out against a trusted key."""
    key = trusted_keys.get(envelope.key_id)
    if key is None:
        raise RejectedError(
            ErrorCode.UNKNOWN_KEY,
            f"signing key {envelope.key_id!r} is not trusted by this agent",
        )
    try:
        signature = base64.b64decode(envelope.signature, validate=True)
        payload = base64.b64decode(envelope.payload, validate=True)
    except binascii.Error:
        raise RejectedError(
            ErrorCode.BAD_ENVELOPE, "signature or payload is not valid base64"
        ) from None
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        raise RejectedError(
            ErrorCode.BAD_SIGNATURE,
            f"signature does not match the payload for key {envelope.key_id!r}",
        ) from None
    return payload


def parse_payload(payload: bytes, model: type[ModelT]) -> ModelT:
    """Decode verified payload bytes strictly into `model`."""
    return _parse_strict(
        payload, model, "payload", ErrorCode.BAD_PAYLOAD, version_required=True
    )


def _parse_strict(
    data: bytes,
    model: type[ModelT],
    part: str,
    invalid_code: ErrorCode,
    *,
    version_required: bool,
) -> ModelT:
    """Parse `data` into `model`, raising `RejectedError` with the code of the defect.

    `part` ("envelope" or "payload") starts every message.
    The bytes are first decoded with `json.loads` under strict hooks. They find the
    defects that pydantic's parser accepts or reports vaguely: duplicate keys, NaN,
    numbers beyond 64 bits and deep nesting. Pydantic then checks the structure.
    `invalid_code` is the code of an invalid value that no other code covers. An
    envelope without `protocol` is version 1, a payload without it is rejected.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedError(
            ErrorCode.INVALID_UTF8, f"{part} is not valid UTF-8 at byte {exc.start}"
        ) from None
    value = _load_json(text, part)
    if not isinstance(value, dict):
        raise RejectedError(
            ErrorCode.WRONG_TYPE,
            f"{part} must be a JSON object, not {_json_type_name(value)}",
        )
    if version_required or "protocol" in value:
        _check_version(value.get("protocol"), part)
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        code = _validation_code(exc, invalid_code)
        raise RejectedError(
            code, f"invalid {part} ({model.__name__}): {describe_validation(exc)}"
        ) from None


def describe_validation(exc: ValidationError, limit: int = 5) -> str:
    """Summarise a pydantic error as `field: reason` pairs, without echoing input values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:limit]:
        location = ".".join(str(item) for item in error["loc"])
        # A validator's own message is a whole sentence, so pydantic's
        # "Value error, " prefix only gets in the way.
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# Integers beyond 64 bits are rejected while parsing, before Python builds them.
MAX_INTEGER_DIGITS = 19
MAX_INTEGER = 2**63 - 1
MIN_INTEGER = -(2**63)

_TYPE_ERRORS = frozenset(
    {
        "bool_type",
        "bytes_type",
        "datetime_type",
        "dict_type",
        "float_type",
        "int_type",
        "list_type",
        "model_attributes_type",
        "model_type",
        "none_required",
        "string_type",
    }
)
_RANGE_ERRORS = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "int_parsing_size",
    }
)


class _JsonDefect(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _load_json(text: str, part: str) -> object:
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_parse_integer,
            parse_float=_parse_float,
            object_pairs_hook=_reject_duplicate_keys,
        )
    except _JsonDefect as defect:
        raise RejectedError(defect.code, f"{part} {defect.message}") from None
    except RecursionError:
        raise RejectedError(
            ErrorCode.MALFORMED_JSON, f"{part} is nested too deeply to parse"
        ) from None
    except ValueError as exc:
        raise RejectedError(
            ErrorCode.MALFORMED_JSON, f"{part} is not valid JSON: {exc}"
        ) from None


def _check_version(version: object, part: str) -> None:
    # `type() is int` keeps true and 1.0, which equal 1 in Python, out.
    if type(version) is not int or version != PROTOCOL_VERSION:
        preview = repr(version)
        if len(preview) > 40:
            preview = preview[:40] + "..."
        raise RejectedError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"{part} protocol version {preview} is not supported; this agent speaks "
            f"version {PROTOCOL_VERSION}",
        )


def _validation_code(exc: ValidationError, invalid_code: ErrorCode) -> ErrorCode:
    """Return the code for the first error that pydantic reports."""
    kind = exc.errors(include_input=False, include_url=False)[0]["type"]
    if kind == "missing":
        return ErrorCode.MISSING_FIELD
    if kind == "extra_forbidden":
        return ErrorCode.UNKNOWN_FIELD
    if kind in _TYPE_ERRORS:
        return ErrorCode.WRONG_TYPE
    if kind in _RANGE_ERRORS:
        return ErrorCode.NUMBER_OUT_OF_RANGE
    if kind == "finite_number":
        return ErrorCode.NON_FINITE_NUMBER
    if kind == "string_too_long":
        return ErrorCode.STRING_TOO_LONG
    if kind == "too_long":
        return ErrorCode.TOO_MANY_ITEMS
    return invalid_code


def _reject_constant(name: str) -> float:
    raise _JsonDefect(
        ErrorCode.NON_FINITE_NUMBER,
        f"contains {name}, which fairu messages do not allow",
    )


def _parse_integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _JsonDefect(
            ErrorCode.NUMBER_OUT_OF_RANGE,
            f"contains an integer of {len(digits.lstrip('-'))} digits; the limit is "
            "a 64-bit integer",
        )
    number = int(digits)
    if not MIN_INTEGER <= number <= MAX_INTEGER:
        raise _JsonDefect(
            ErrorCode.NUMBER_OUT_OF_RANGE,
            f"contains the integer {digits}, outside the 64-bit range",
        )
    return number


def _parse_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        preview = text if len(text) <= 40 else text[:40] + "..."
        raise _JsonDefect(
            ErrorCode.NUMBER_OUT_OF_RANGE,
            f"contains the number {preview}, beyond the range of a 64-bit float",
        )
    return number


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Parsers differ on which of two equal keys wins, so a signed message with
    # duplicates could mean one thing to the agent and another to the platform.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _JsonDefect(
                ErrorCode.MALFORMED_JSON, f"contains the key {key[:60]!r} twice"
            )
        result[key] = value
    return result


def _json_type_name(value: object) -> str:
    names = {list: "an array", str: "a string", int: "a number", float: "a number"}
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return names.get(type(value), type(value).__name__)


def open_unverified(body: bytes, model: type[ModelT], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ModelT:
    """Decode a signed message without checking its signature.

    Only for showing progress to a person (as `fairu-admin submit --wait` does);
    anything that records or acts on a message verifies it first.
    """
    envelope = decode_envelope(body, max_bytes)
    try:
        payload = base64.b64decode(envelope.payload, validate=True)
    except binascii.Error:
        raise RejectedError(ErrorCode.BAD_ENVELOPE, "payload is not valid base64") from None
    return parse_payload(payload, model)
