"""Fixtures shared by all tests.

The podman fixtures fail, never skip, when the API service or the image is missing,
so that a CI machine without them cannot pass.
"""

from __future__ import annotations

import os
import pwd

import podman
import pytest
from podman.errors import APIError

# The rootless user whose podman API service scripts/setup-host.sh starts.
PODMAN_USER = "fairu"
EXAMPLE_IMAGE = "localhost/fairu-python:1"
SETUP_FIX = "run scripts/setup-host.sh as root"


@pytest.fixture(scope="session")
def podman_socket() -> str:
    """URL of the podman API socket: $FAIRU_PODMAN_SOCKET, else user fairu's socket."""
    url = os.environ.get("FAIRU_PODMAN_SOCKET")
    if not url:
        try:
            uid = pwd.getpwnam(PODMAN_USER).pw_uid
        except KeyError:
            pytest.fail(f"user {PODMAN_USER} not found; {SETUP_FIX}", pytrace=False)
        url = f"unix:///run/user/{uid}/podman/podman.sock"
    with podman.PodmanClient(base_url=url, timeout=10) as client:
        try:
            answered = client.ping()
        except APIError as error:
            pytest.fail(
                f"the podman API service at {url} is not answering "
                f"({error.__cause__ or error}); {SETUP_FIX}",
                pytrace=False,
            )
    if not answered:
        pytest.fail(
            f"the podman API service at {url} failed _ping; {SETUP_FIX}", pytrace=False
        )
    return url


@pytest.fixture(scope="session")
def image(podman_socket: str) -> str:
    """Name of the example image, checked to exist in the podman service's store."""
    with podman.PodmanClient(base_url=podman_socket, timeout=10) as client:
        if not client.images.exists(EXAMPLE_IMAGE):
            pytest.fail(
                f"image {EXAMPLE_IMAGE} not found at {podman_socket}; {SETUP_FIX} "
                "(it runs scripts/build-image.sh)",
                pytrace=False,
            )
    return EXAMPLE_IMAGE
