"""Certificates, revocation lists and root chains, without a broker."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from fairu.protocol import ErrorCode, RejectedError, utc_now
from fairu.protocol.models import RootChain
from fairu.protocol.signing import generate_private_key, key_id_for, sign_payload
from fairu.protocol.trust import (
    TrustView,
    VerifiedCertificates,
    advance_root,
    issue_certificate,
    read_certificate,
    sign_job,
    sign_revocation_list,
    sign_rotation,
    verify_job_envelope,
    verify_revocation_list,
)

PAYLOAD = b'{"protocol": 1}'


def certified(root, signer, start_offset_s=-60, lifetime_s=3600):
    now = utc_now()
    start = now + timedelta(seconds=start_offset_s)
    return issue_certificate(root, signer.public_key(), start, start + timedelta(seconds=lifetime_s))


def view(root, **fields):
    return TrustView(root_key=root.public_key(), **fields)


def code_of(envelope, trust):
    with pytest.raises(RejectedError) as caught:
        verify_job_envelope(envelope, trust)
    return caught.value.code


def test_certified_job_accepted(root, signer):
    envelope = sign_job(PAYLOAD, signer, certified(root, signer))
    assert verify_job_envelope(envelope, view(root)) == PAYLOAD


def test_certificate_from_other_root(root, signer):
    other = generate_private_key()
    envelope = sign_job(PAYLOAD, signer, certified(other, signer))
    assert code_of(envelope, view(root)) is ErrorCode.BAD_CERTIFICATE


@pytest.mark.parametrize(
    "offset_s, lifetime_s",
    [pytest.param(-7200, 3600, id="expired"), pytest.param(3600, 3600, id="not-yet-valid")],
)
def test_certificate_outside_validity(root, signer, offset_s, lifetime_s):
    envelope = sign_job(PAYLOAD, signer, certified(root, signer, offset_s, lifetime_s))
    assert code_of(envelope, view(root)) is ErrorCode.CERTIFICATE_EXPIRED


def test_clock_skew_allowance(root, signer):
    envelope = sign_job(PAYLOAD, signer, certified(root, signer, -3630, 3600))
    assert code_of(envelope, view(root, clock_skew=timedelta(0))) is ErrorCode.CERTIFICATE_EXPIRED
    assert verify_job_envelope(envelope, view(root, clock_skew=timedelta(seconds=60)))


def test_revoked_key(root, signer):
    envelope = sign_job(PAYLOAD, signer, certified(root, signer))
    trust = view(root, revoked=frozenset({key_id_for(signer.public_key())}))
    assert code_of(envelope, trust) is ErrorCode.KEY_REVOKED


def test_certificate_for_other_key(root, signer):
    other = generate_private_key()
    envelope = sign_job(PAYLOAD, other, certified(root, signer))
    assert code_of(envelope, view(root)) is ErrorCode.BAD_CERTIFICATE


def test_uncertified_key_with_root_pinned(root, signer):
    envelope = sign_job(PAYLOAD, signer, None)
    assert code_of(envelope, view(root)) is ErrorCode.UNKNOWN_KEY


def test_verified_certificate_is_kept(root, signer):
    trust = view(root)
    envelope = sign_job(PAYLOAD, signer, certified(root, signer))
    assert verify_job_envelope(envelope, trust) == PAYLOAD
    assert len(trust.certificates) == 1
    assert verify_job_envelope(envelope, trust) == PAYLOAD
    assert len(trust.certificates) == 1


def test_rejected_certificate_is_not_kept(root, signer):
    trust = view(root)
    envelope = sign_job(PAYLOAD, signer, certified(generate_private_key(), signer))
    assert code_of(envelope, trust) is ErrorCode.BAD_CERTIFICATE
    assert len(trust.certificates) == 0
    assert code_of(envelope, trust) is ErrorCode.BAD_CERTIFICATE


def test_kept_certificate_with_other_signature(root, signer):
    trust = view(root)
    certificate = certified(root, signer)
    assert verify_job_envelope(sign_job(PAYLOAD, signer, certificate), trust) == PAYLOAD
    # The same body under another signature is a different certificate to the cache.
    forged_signature = base64.b64encode(bytes(64)).decode("ascii")
    forged = certificate.model_copy(update={"signature": forged_signature})
    assert code_of(sign_job(PAYLOAD, signer, forged), trust) is ErrorCode.BAD_CERTIFICATE


def test_kept_certificate_still_expires(root, signer):
    trust = view(root, clock_skew=timedelta(0))
    envelope = sign_job(PAYLOAD, signer, certified(root, signer, -60, 3600))
    assert verify_job_envelope(envelope, trust) == PAYLOAD
    later = utc_now() + timedelta(hours=2)
    with pytest.raises(RejectedError) as caught:
        verify_job_envelope(envelope, trust, now=later)
    assert caught.value.code is ErrorCode.CERTIFICATE_EXPIRED


def test_kept_certificate_still_revocable(root, signer):
    trust = view(root)
    envelope = sign_job(PAYLOAD, signer, certified(root, signer))
    assert verify_job_envelope(envelope, trust) == PAYLOAD
    revoked = view(
        root,
        revoked=frozenset({key_id_for(signer.public_key())}),
        certificates=trust.certificates,
    )
    assert code_of(envelope, revoked) is ErrorCode.KEY_REVOKED


def test_kept_certificate_checks_job_signature(root, signer):
    trust = view(root)
    certificate = certified(root, signer)
    envelope = sign_job(PAYLOAD, signer, certificate)
    assert verify_job_envelope(envelope, trust) == PAYLOAD
    forged_signature = base64.b64encode(bytes(64)).decode("ascii")
    forged = envelope.model_copy(update={"signature": forged_signature})
    assert code_of(forged, trust) is ErrorCode.BAD_SIGNATURE


def test_kept_certificate_skips_root_check(root, signer):
    # A certificate that no root here signed, put in the cache by hand: only a cache
    # hit can make the job pass.
    other_root = generate_private_key()
    certificate = certified(other_root, signer)
    trust = view(root)
    trust.certificates.add(
        root.public_key(), certificate, read_certificate(certificate), signer.public_key()
    )
    assert verify_job_envelope(sign_job(PAYLOAD, signer, certificate), trust) == PAYLOAD


def test_kept_certificate_other_root(root, signer):
    old_view = view(root)
    envelope = sign_job(PAYLOAD, signer, certified(root, signer))
    assert verify_job_envelope(envelope, old_view) == PAYLOAD
    new_root = generate_private_key()
    new_view = view(new_root, certificates=old_view.certificates)
    assert code_of(envelope, new_view) is ErrorCode.BAD_CERTIFICATE


def test_verified_certificates_bounded(root):
    trust = view(root, certificates=VerifiedCertificates(max_entries=2))
    signers = [generate_private_key() for _ in range(3)]
    certificates = [certified(root, signer) for signer in signers]
    envelopes = [
        sign_job(PAYLOAD, signer, certificate)
        for signer, certificate in zip(signers, certificates)
    ]
    assert verify_job_envelope(envelopes[0], trust) == PAYLOAD
    assert verify_job_envelope(envelopes[1], trust) == PAYLOAD
    # The first is used again, so the second is the least recently used.
    assert verify_job_envelope(envelopes[0], trust) == PAYLOAD
    assert verify_job_envelope(envelopes[2], trust) == PAYLOAD
    assert len(trust.certificates) == 2
    assert trust.certificates.get(root.public_key(), certificates[1]) is None
    assert trust.certificates.get(root.public_key(), certificates[0]) is not None
    assert trust.certificates.get(root.public_key(), certificates[2]) is not None


def test_verified_certificates_size_checked():
    with pytest.raises(ValueError, match="max_entries must be at least 1, not 0"):
        VerifiedCertificates(max_entries=0)


def test_revocation_list_roundtrip(root):
    envelope = sign_revocation_list(root, 3, ["ed25519:b", "ed25519:a", "ed25519:a"])
    revocations = verify_revocation_list(envelope, root.public_key())
    assert revocations.version == 3
    assert revocations.revoked == ["ed25519:a", "ed25519:b"]


def test_revocation_list_from_other_key(root):
    envelope = sign_revocation_list(generate_private_key(), 3, [])
    with pytest.raises(RejectedError):
        verify_revocation_list(envelope, root.public_key())


def test_chain_advances_through_links(root):
    second = generate_private_key()
    third = generate_private_key()
    chain = RootChain(
        links=[sign_rotation(root, second.public_key(), 2), sign_rotation(second, third.public_key(), 3)]
    )
    advance = advance_root(root.public_key(), 1, chain)
    assert advance.version == 3
    assert key_id_for(advance.key) == key_id_for(third.public_key())
    assert advance.accepted == 2


def test_chain_skips_links_already_followed(root):
    second = generate_private_key()
    chain = RootChain(links=[sign_rotation(root, second.public_key(), 2)])
    advance = advance_root(second.public_key(), 2, chain)
    assert advance.accepted == 0
    assert advance.version == 2


def test_unchained_link_rejected(root):
    impostor = generate_private_key()
    chain = RootChain(links=[sign_rotation(impostor, impostor.public_key(), 2)])
    with pytest.raises(RejectedError, match="not signed by the current root"):
        advance_root(root.public_key(), 1, chain)


def test_link_skipping_a_version_rejected(root):
    third = generate_private_key()
    chain = RootChain(links=[sign_rotation(root, third.public_key(), 3)])
    with pytest.raises(RejectedError, match="does not follow version 1"):
        advance_root(root.public_key(), 1, chain)


def test_root_signature_is_not_certificate(root, signer):
    envelope = sign_payload(PAYLOAD, root)
    assert code_of(envelope, view(root)) is ErrorCode.UNKNOWN_KEY


def test_site_pinning_later_root_follows_chain(root):
    second = generate_private_key()
    third = generate_private_key()
    chain = RootChain(
        links=[sign_rotation(root, second.public_key(), 2), sign_rotation(second, third.public_key(), 3)]
    )
    # A site installed after the first rotation pins the second root, and has no
    # version for it until the chain names it.
    advance = advance_root(second.public_key(), 1, chain)
    assert advance.version == 3
    assert key_id_for(advance.key) == key_id_for(third.public_key())
