"""The chain of trust: a root key, certificates for job-signing keys, revocation lists
and root rotations. Pure functions over keys and models; no I/O.

A job envelope is accepted after four checks, in this order. Its certificate verifies
against the current root. The certificate is valid at receipt, within the clock-skew
allowance. Its key is not revoked. The envelope's signature verifies with the
certified key.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import ErrorCode, RejectedError
from .models import (
    Certificate,
    CertificateBody,
    Envelope,
    RevocationList,
    RootChain,
    RootRotation,
    utc_now,
)
from .signing import (
    key_id_for,
    load_public_key_text,
    parse_payload,
    public_key_text,
    sign_payload,
    verify_envelope,
)


class VerifiedCertificates:
    """Certificates whose signature a root key verified, by that key and their exact text.

    The root's signature over the same body bytes verifies the same way every time,
    so a certificate seen again skips the signature check and the parse of its body.
    Its validity window and the revocations are still checked on every use. The root
    key is part of each entry's key, so a cache shared with a view of another root
    finds nothing there.
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[
            tuple[bytes, str, str], tuple[CertificateBody, Ed25519PublicKey]
        ] = OrderedDict()
        # A TrustView may be used from several threads at once.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, root_key: Ed25519PublicKey, certificate: Certificate
    ) -> tuple[CertificateBody, Ed25519PublicKey] | None:
        key = _certificate_key(root_key, certificate)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def add(
        self,
        root_key: Ed25519PublicKey,
        certificate: Certificate,
        body: CertificateBody,
        public: Ed25519PublicKey,
    ) -> None:
        key = _certificate_key(root_key, certificate)
        with self._lock:
            self._entries[key] = (body, public)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def _certificate_key(
    root_key: Ed25519PublicKey, certificate: Certificate
) -> tuple[bytes, str, str]:
    return (root_key.public_bytes_raw(), certificate.body, certificate.signature)


@dataclass(frozen=True)
class TrustView:
    """The root, revocations and bare keys an agent trusts at one moment."""

    root_key: Ed25519PublicKey | None
    revoked: frozenset[str] = frozenset()
    # Keys trusted without a certificate, straight from the site config.
    direct_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    clock_skew: timedelta = timedelta(seconds=60)
    # Filled by verify_certificate.
    certificates: VerifiedCertificates = field(
        default_factory=VerifiedCertificates, compare=False, repr=False
    )

    @property
    def root_key_id(self) -> str | None:
        return key_id_for(self.root_key) if self.root_key else None


# --- certificates ----------------------------------------------------------------


def issue_certificate(
    root: Ed25519PrivateKey,
    signing_key: Ed25519PublicKey,
    not_before: datetime,
    not_after: datetime,
) -> Certificate:
    body = CertificateBody(
        key_id=key_id_for(signing_key),
        public_key=public_key_text(signing_key),
        not_before=not_before,
        not_after=not_after,
        issuer=key_id_for(root.public_key()),
    )
    data = body.model_dump_json().encode()
    return Certificate(
        body=base64.b64encode(data).decode("ascii"),
        signature=base64.b64encode(root.sign(data)).decode("ascii"),
    )


def read_certificate(certificate: Certificate) -> CertificateBody:
    """Decode a certificate's body without checking it, for display and bookkeeping."""
    return parse_payload(_b64(certificate.body, "certificate body"), CertificateBody)


def verify_certificate(
    certificate: Certificate, trust: TrustView, now: datetime | None = None
) -> tuple[CertificateBody, Ed25519PublicKey]:
    if trust.root_key is None:
        raise RejectedError(
            ErrorCode.BAD_CERTIFICATE,
            "the job carries a certificate but this site pins no root key "
            "(set trust.root_key in the site config)",
        )
    verified = trust.certificates.get(trust.root_key, certificate)
    if verified is None:
        body, public = _check_root_signature(certificate, trust.root_key)
        trust.certificates.add(trust.root_key, certificate, body, public)
    else:
        body, public = verified

    now = now or utc_now()
    if now + trust.clock_skew < body.not_before:
        raise RejectedError(
            ErrorCode.CERTIFICATE_EXPIRED,
            f"certificate of key {body.key_id} is not valid before "
            f"{body.not_before.isoformat()}",
        )
    if now - trust.clock_skew > body.not_after:
        raise RejectedError(
            ErrorCode.CERTIFICATE_EXPIRED,
            f"certificate of key {body.key_id} expired at {body.not_after.isoformat()}",
        )
    if body.key_id in trust.revoked:
        raise RejectedError(ErrorCode.KEY_REVOKED, f"signing key {body.key_id} is revoked")
    return body, public


def _check_root_signature(
    certificate: Certificate, root_key: Ed25519PublicKey
) -> tuple[CertificateBody, Ed25519PublicKey]:
    """Verify a certificate's signature by `root_key` and return its body and key."""
    data = _b64(certificate.body, "certificate body")
    signature = _b64(certificate.signature, "certificate signature")
    try:
        root_key.verify(signature, data)
    except InvalidSignature:
        raise RejectedError(
            ErrorCode.BAD_CERTIFICATE,
            f"certificate is not signed by the current root key {key_id_for(root_key)}; "
            "a root rotation invalidates certificates of the earlier root",
        ) from None
    try:
        body = parse_payload(data, CertificateBody)
    except RejectedError as exc:
        raise RejectedError(ErrorCode.BAD_CERTIFICATE, exc.message) from None
    return body, load_certified_key(body)


def load_certified_key(body: CertificateBody) -> Ed25519PublicKey:
    try:
        public = load_public_key_text(body.public_key)
    except Exception:
        raise RejectedError(
            ErrorCode.BAD_CERTIFICATE, "certificate holds an invalid public key"
        ) from None
    if key_id_for(public) != body.key_id:
        raise RejectedError(
            ErrorCode.BAD_CERTIFICATE,
            f"certificate key id {body.key_id} does not match its public key",
        )
    return public


def verify_job_envelope(
    envelope: Envelope, trust: TrustView, now: datetime | None = None
) -> bytes:
    """Return the payload bytes of a job envelope that the trust view accepts."""
    if envelope.certificate is None:
        if envelope.key_id in trust.revoked:
            raise RejectedError(ErrorCode.KEY_REVOKED, f"signing key {envelope.key_id} is revoked")
        if envelope.key_id not in trust.direct_keys and trust.root_key is not None:
            raise RejectedError(
                ErrorCode.UNKNOWN_KEY,
                f"signing key {envelope.key_id!r} comes with no certificate and is not "
                "a trusted signing key here; sign with a key that the root certified "
                "(`fairu-admin keys issue`) instead of a bare --key",
            )
        return verify_envelope(envelope, trust.direct_keys)
    body, public = verify_certificate(envelope.certificate, trust, now)
    if envelope.key_id != body.key_id:
        raise RejectedError(
            ErrorCode.BAD_CERTIFICATE,
            f"envelope names key {envelope.key_id} but its certificate is for {body.key_id}",
        )
    return verify_envelope(envelope, {body.key_id: public})


def sign_job(
    payload: bytes, key: Ed25519PrivateKey, certificate: Certificate | None
) -> Envelope:
    envelope = sign_payload(payload, key)
    return envelope.model_copy(update={"certificate": certificate})


# --- revocation ------------------------------------------------------------------


def sign_revocation_list(
    root: Ed25519PrivateKey, version: int, revoked: list[str]
) -> Envelope:
    body = RevocationList(
        version=version,
        revoked=sorted(set(revoked)),
        issued_at=utc_now(),
        issuer=key_id_for(root.public_key()),
    )
    return sign_payload(body.model_dump_json().encode(), root)


def verify_revocation_list(envelope: Envelope, root: Ed25519PublicKey) -> RevocationList:
    payload = verify_envelope(envelope, {key_id_for(root): root})
    return parse_payload(payload, RevocationList)


# --- root rotation ---------------------------------------------------------------


def sign_rotation(
    current_root: Ed25519PrivateKey, new_root: Ed25519PublicKey, version: int
) -> Envelope:
    link = RootRotation(
        version=version,
        new_root_key=public_key_text(new_root),
        issued_at=utc_now(),
        issuer=key_id_for(current_root.public_key()),
    )
    return sign_payload(link.model_dump_json().encode(), current_root)


@dataclass(frozen=True)
class RootAdvance:
    key: Ed25519PublicKey
    version: int
    accepted: int


def advance_root(
    current: Ed25519PublicKey, version: int, chain: RootChain
) -> RootAdvance:
    """Follow the chain's links past `version`, each verified by the root before it.

    Links at or below `version` are skipped, so the whole chain can be sent every
    time. A link the current root did not sign raises `RejectedError`.
    """
    key, accepted = current, 0
    # A site may pin a root that came later than the first one; the link that
    # introduced that root gives its version.
    current_text = public_key_text(current)
    for link in chain.links:
        claimed = _peek_rotation(link)
        if claimed is not None and claimed.new_root_key == current_text:
            version = max(version, claimed.version)
    for link in chain.links:
        claimed = _peek_rotation(link)
        if claimed is not None and claimed.version <= version:
            continue
        try:
            payload = verify_envelope(link, {key_id_for(key): key})
        except RejectedError:
            raise RejectedError(
                ErrorCode.BAD_SIGNATURE,
                f"root rotation to version {claimed.version if claimed else '?'} is not "
                f"signed by the current root {key_id_for(key)} (version {version})",
            ) from None
        rotation = parse_payload(payload, RootRotation)
        if rotation.version != version + 1:
            raise RejectedError(
                ErrorCode.BAD_PAYLOAD,
                f"root rotation version {rotation.version} does not follow version {version}",
            )
        key = load_public_key_text(rotation.new_root_key)
        version = rotation.version
        accepted += 1
    return RootAdvance(key, version, accepted)


def _peek_rotation(link: Envelope) -> RootRotation | None:
    try:
        return parse_payload(_b64(link.payload, "payload"), RootRotation)
    except RejectedError:
        return None


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise RejectedError(ErrorCode.BAD_CERTIFICATE, f"{what} is not valid base64") from None
