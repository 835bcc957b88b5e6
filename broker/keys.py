"""The admin's key folder: the root key, job-signing keys with their certificates,
the root chain and the revocation state.

    root.key, root.pub        the current root (private key mode 0600, maybe encrypted)
    roots/v<N>.key            earlier roots, kept after a rotation
    chain.json                every root rotation, as signed links
    signing/<hex>.key         job-signing private keys
    signing/<hex>.cert.json   their certificates
    state.json                root version, current signing key, revocation version and list

Only `fairu-admin` reads this folder; agents see certificates inside job envelopes
and the trust messages published on the trust exchange.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fairu.files import write_atomic
from fairu.protocol.errors import ConfigError
from fairu.protocol.models import Certificate, CertificateBody, Envelope, RootChain, utc_now
from fairu.protocol.signing import (
    generate_private_key,
    key_id_for,
    load_private_key,
    public_key_text,
    write_private_key,
)
from fairu.protocol.trust import (
    issue_certificate,
    read_certificate,
    sign_revocation_list,
    sign_rotation,
)


@dataclass
class KeyState:
    root_version: int = 1
    current_signing: str | None = None
    revocation_version: int = 0
    revoked: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SigningKey:
    key: Ed25519PrivateKey
    certificate: Certificate
    body: CertificateBody


class KeyFolder:
    def __init__(self, root: Path, passphrase: bytes | None = None) -> None:
        self.root = root.expanduser()
        self.passphrase = passphrase

    # --- root -------------------------------------------------------------------

    def init_root(self) -> str:
        if (self.root / "root.key").exists():
            raise ConfigError(
                f"{self.root / 'root.key'} already exists; use `keys rotate-root` to replace it"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        key = generate_private_key()
        write_private_key(self.root / "root.key", key, self.passphrase)
        (self.root / "root.pub").write_text(public_key_text(key.public_key()) + "\n")
        self._write("chain.json", json.loads(RootChain(links=[]).model_dump_json()))
        self.save_state(KeyState())
        return key_id_for(key.public_key())

    def root_key(self) -> Ed25519PrivateKey:
        path = self.root / "root.key"
        if not path.exists():
            raise ConfigError(
                f"no root key at {path}; make one with `fairu-admin keys --keys-dir "
                f"{self.root} init-root`"
            )
        return load_private_key(path, self.passphrase)

    def rotate_root(self) -> tuple[str, int, RootChain]:
        """Make a new root signed by the current one; return its id, version and chain."""
        current = self.root_key()
        state = self.load_state()
        version = state.root_version + 1
        new_root = generate_private_key()
        link = sign_rotation(current, new_root.public_key(), version)
        chain = self.chain()
        chain = RootChain(links=[*chain.links, link])

        retired = self.root / "roots"
        retired.mkdir(exist_ok=True)
        os.replace(self.root / "root.key", retired / f"v{state.root_version}.key")
        write_private_key(self.root / "root.key", new_root, self.passphrase)
        (self.root / "root.pub").write_text(public_key_text(new_root.public_key()) + "\n")
        self._write("chain.json", json.loads(chain.model_dump_json()))
        state.root_version = version
        self.save_state(state)
        return key_id_for(new_root.public_key()), version, chain

    def chain(self) -> RootChain:
        data = self._read("chain.json")
        return RootChain.model_validate(data) if data else RootChain(links=[])

    # --- signing keys -----------------------------------------------------------

    def issue(self, valid_for: timedelta, make_current: bool) -> SigningKey:
        root = self.root_key()
        key = generate_private_key()
        now = utc_now()
        certificate = issue_certificate(root, key.public_key(), now, now + valid_for)
        key_id = key_id_for(key.public_key())
        folder = self.root / "signing"
        folder.mkdir(exist_ok=True)
        stem = key_id.split(":", 1)[1]
        write_private_key(folder / f"{stem}.key", key, self.passphrase)
        self._write(f"signing/{stem}.cert.json", json.loads(certificate.model_dump_json()))
        state = self.load_state()
        if make_current or state.current_signing is None:
            state.current_signing = key_id
            self.save_state(state)
        return SigningKey(key, certificate, read_certificate(certificate))

    def current_signing_key(self) -> SigningKey:
        state = self.load_state()
        if state.current_signing is None:
            raise ConfigError(
                f"no job-signing key in {self.root}; issue one with `fairu-admin keys issue`"
            )
        return self.signing_key(state.current_signing)

    def signing_key(self, key_id: str) -> SigningKey:
        stem = key_id.split(":", 1)[-1]
        data = self._read(f"signing/{stem}.cert.json")
        if data is None:
            raise ConfigError(f"no signing key {key_id} in {self.root / 'signing'}")
        certificate = Certificate.model_validate(data)
        key = load_private_key(self.root / "signing" / f"{stem}.key", self.passphrase)
        return SigningKey(key, certificate, read_certificate(certificate))

    def signing_keys(self) -> list[CertificateBody]:
        folder = self.root / "signing"
        bodies = []
        for path in sorted(folder.glob("*.cert.json")) if folder.exists() else []:
            bodies.append(read_certificate(Certificate.model_validate_json(path.read_text())))
        return sorted(bodies, key=lambda body: body.not_before)

    # --- revocation -------------------------------------------------------------

    def revoke(self, key_id: str) -> Envelope:
        """Add `key_id` to the revocation list and return the new list, signed."""
        state = self.load_state()
        known = {body.key_id for body in self.signing_keys()}
        if key_id not in known:
            raise ConfigError(
                f"no signing key {key_id} in {self.root / 'signing'}; `fairu-admin keys "
                "list` shows the key ids"
            )
        state.revoked = sorted({*state.revoked, key_id})
        state.revocation_version += 1
        envelope = sign_revocation_list(self.root_key(), state.revocation_version, state.revoked)
        if state.current_signing == key_id:
            state.current_signing = None
        self.save_state(state)
        self._write("revocations.json", json.loads(envelope.model_dump_json()))
        return envelope

    # --- files ------------------------------------------------------------------

    def load_state(self) -> KeyState:
        data = self._read("state.json")
        if data is None:
            raise ConfigError(
                f"{self.root} is not a fairu key folder; make one with `fairu-admin keys "
                "init-root`"
            )
        return KeyState(**data)

    def save_state(self, state: KeyState) -> None:
        self._write("state.json", state.__dict__)

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self.root / name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.root / name}: {exc}") from None

    def _write(self, name: str, data: dict) -> None:
        text = json.dumps(data, indent=2, default=_json_default) + "\n"
        write_atomic(self.root / name, text.encode(), mode=0o600)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")
