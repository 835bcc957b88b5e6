"""Error codes carried by failed results, and the exception tree that maps to them.

Every failure on an agent ends as a `JobResult` whose `error.code` is one of
`ErrorCode`. Exceptions raised inside fairu derive from `FairuError`:

    FairuError
    ├── ConfigError            bad site config or CLI input; never reaches a result
    └── JobError               ends one job with `code`
        ├── RejectedError      the message is refused before anything runs
        └── RetryableError     a transient failure; the delivery may be retried
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # The envelope and its signature.
    MESSAGE_TOO_LARGE = "message_too_large"
    BAD_ENVELOPE = "bad_envelope"
    UNKNOWN_KEY = "unknown_key"
    BAD_CERTIFICATE = "bad_certificate"
    CERTIFICATE_EXPIRED = "certificate_expired"
    KEY_REVOKED = "key_revoked"
    BAD_SIGNATURE = "bad_signature"
    # The payload.
    BAD_PAYLOAD = "bad_payload"
    UNSUPPORTED_VERSION = "unsupported_version"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    AUDIENCE_MISMATCH = "audience_mismatch"
    # Why the envelope or the payload failed to parse. `bad_envelope` and
    # `bad_payload` cover any other invalid value (a pattern, a date, a literal).
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    WRONG_TYPE = "wrong_type"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    NUMBER_OUT_OF_RANGE = "number_out_of_range"
    NON_FINITE_NUMBER = "non_finite_number"
    STRING_TOO_LONG = "string_too_long"
    TOO_MANY_ITEMS = "too_many_items"
    # Site policy: each kind of violation has its own code.
    COMPETITION_NOT_ALLOWED = "competition_not_allowed"
    IMAGE_NOT_ALLOWED = "image_not_allowed"
    RESOURCES_EXCEED_POLICY = "resources_exceed_policy"
    # Scheduling: no agent serving the job's queue offers what the job requests.
    UNSCHEDULABLE = "unschedulable"
    EGRESS_NOT_ALLOWED = "egress_not_allowed"
    # Inputs.
    INPUT_FETCH_FAILED = "input_fetch_failed"
    INPUT_DIGEST_MISMATCH = "input_digest_mismatch"
    INPUT_UNPACK_FAILED = "input_unpack_failed"
    INPUT_UNSAFE_MEMBER = "input_unsafe_member"
    INPUT_TOO_LARGE = "input_too_large"
    # The container.
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    CONTAINER_FAILED = "container_failed"
    NONZERO_EXIT = "nonzero_exit"
    TIMED_OUT = "timed_out"
    # Outputs.
    MISSING_SCORES = "missing_scores"
    BAD_SCORES = "bad_scores"
    MISSING_ARTIFACT = "missing_artifact"
    ARTIFACTS_TOO_LARGE = "artifacts_too_large"
    # A shard's predictions are invalid or do not cover its rectangle exactly once.
    BAD_PREDICTIONS = "bad_predictions"
    # The platform ended the job.
    CANCELLED = "cancelled"
    DELIVERY_LIMIT = "delivery_limit"
    # The agents that claimed the job stopped renewing its lease too many times.
    LEASE_EXPIRED = "lease_expired"
    OUTPUT_TOO_LARGE = "output_too_large"
    # Anything else: a bug in fairu, reported instead of losing the job.
    INTERNAL_ERROR = "internal_error"


class FairuError(Exception):
    """Base of every error that fairu raises on purpose."""


class ConfigError(FairuError):
    """A site config, key file or command-line value is invalid; the message names the fix."""


class JobError(FairuError):
    """A failure that ends one job with a failed result carrying `code`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RejectedError(JobError):
    """The message is refused before any of its work starts (signature, expiry, policy)."""


class RetryableError(JobError):
    """A transient failure (a network error while fetching inputs, the runtime down)."""
