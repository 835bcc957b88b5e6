"""Fixtures shared by the unit tests of the chain of trust."""

from __future__ import annotations

import pytest

from fairu.protocol.signing import generate_private_key


@pytest.fixture
def root():
    """A root key that certifies job-signing keys."""
    return generate_private_key()


@pytest.fixture
def signer():
    """A job-signing key."""
    return generate_private_key()
