"""The agent's trust store: one shared view until the root or the revocations change."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fairu.agent.trust import TrustStore
from fairu.protocol import ErrorCode, RejectedError, utc_now
from fairu.protocol.models import RootChain
from fairu.protocol.signing import generate_private_key, key_id_for
from fairu.protocol.trust import (
    issue_certificate,
    sign_job,
    sign_revocation_list,
    sign_rotation,
    verify_job_envelope,
)

PAYLOAD = b'{"protocol": 1}'


@pytest.fixture
def store(tmp_path, root):
    trust = TrustStore(tmp_path / "trust", root.public_key(), {}, timedelta(seconds=60))
    trust.load()
    return trust


def certified_job(root, signer):
    now = utc_now()
    certificate = issue_certificate(
        root, signer.public_key(), now - timedelta(minutes=1), now + timedelta(hours=1)
    )
    return sign_job(PAYLOAD, signer, certificate)


def rejection_code(envelope, store):
    with pytest.raises(RejectedError) as caught:
        verify_job_envelope(envelope, store.view())
    return caught.value.code


def test_load_replaces_view(tmp_path, root):
    store = TrustStore(tmp_path / "trust", root.public_key(), {}, timedelta(seconds=60))
    assert store.view().root_key is None
    store.load()
    loaded = store.view().root_key
    assert loaded is not None
    assert key_id_for(loaded) == key_id_for(root.public_key())


def test_view_shared_between_jobs(store, root, signer):
    first = store.view()
    assert verify_job_envelope(certified_job(root, signer), first) == PAYLOAD
    assert store.view() is first
    assert len(first.certificates) == 1


def test_revocation_replaces_view(store, root, signer):
    envelope = certified_job(root, signer)
    before = store.view()
    assert verify_job_envelope(envelope, before) == PAYLOAD

    revocations = sign_revocation_list(root, 1, [key_id_for(signer.public_key())])
    assert store.apply_revocations(revocations)
    assert store.view() is not before
    assert rejection_code(envelope, store) is ErrorCode.KEY_REVOKED


def test_root_rotation_replaces_view(store, root, signer):
    envelope = certified_job(root, signer)
    before = store.view()
    assert verify_job_envelope(envelope, before) == PAYLOAD

    second = generate_private_key()
    assert store.apply_chain(RootChain(links=[sign_rotation(root, second.public_key(), 2)])) == 1
    after = store.view()
    assert after is not before
    assert key_id_for(after.root_key) == key_id_for(second.public_key())
    # The old root's certificate was verified under the old view only.
    assert rejection_code(envelope, store) is ErrorCode.BAD_CERTIFICATE
    assert verify_job_envelope(certified_job(second, signer), after) == PAYLOAD


def test_older_revocation_list_keeps_view(store, root, signer):
    assert store.apply_revocations(sign_revocation_list(root, 2, []))
    current = store.view()
    assert not store.apply_revocations(sign_revocation_list(root, 1, []))
    assert store.view() is current
