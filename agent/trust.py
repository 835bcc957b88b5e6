"""The agent's trust state, kept in the state folder so it survives restarts.

    trust/root.json         the current root: pinned key, version and key
    trust/revocations.json  the newest revocation list accepted, as its signed envelope

The root starts as the key pinned in the site config and only moves forward through
rotations the current root signed. A revocation list replaces the stored one only
when its version is higher. Both files are written atomically.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fairu.files import write_atomic
from fairu.protocol.errors import ErrorCode, RejectedError
from fairu.protocol.models import Envelope, RevocationList, RootChain
from fairu.protocol.signing import (
    key_id_for,
    load_public_key_text,
    public_key_text,
)
from fairu.protocol.trust import TrustView, advance_root, verify_revocation_list

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RootState:
    pinned: str
    version: int
    key: str


class TrustStore:
    def __init__(
        self,
        folder: Path,
        pinned_root: Ed25519PublicKey | None,
        direct_keys: dict[str, Ed25519PublicKey],
        clock_skew: timedelta,
    ) -> None:
        self.folder = folder
        self._pinned = pinned_root
        self._direct = direct_keys
        self._skew = clock_skew
        self._lock = threading.Lock()
        self._root: RootState | None = None
        self._revocations: RevocationList | None = None
        # Built on first use after each change of the root or the revocations, so that
        # jobs share one view and its verified certificates.
        self._view: TrustView | None = None

    def load(self) -> None:
        """Read the stored root and revocation list; blocking, call it in a thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        if self._pinned is not None:
            pinned = public_key_text(self._pinned)
            stored = self._read_root()
            if stored is None or stored.pinned != pinned:
                stored = RootState(pinned=pinned, version=1, key=pinned)
                self._write_json("root.json", stored.__dict__)
            self._root = stored
            logger.info(
                "trusting root %s at version %d",
                key_id_for(load_public_key_text(stored.key)), stored.version,
            )
        envelope = self._read_revocation_envelope()
        if envelope is not None and self._root is not None:
            try:
                self._revocations = verify_revocation_list(envelope, self.root_key())
            except RejectedError as exc:
                logger.error("stored revocation list ignored: %s", exc)
        with self._lock:
            self._view = None
        if self._revocations is not None:
            logger.info(
                "loaded revocation list version %d with %d revoked keys",
                self._revocations.version, len(self._revocations.revoked),
            )

    def root_key(self) -> Ed25519PublicKey:
        assert self._root is not None
        return load_public_key_text(self._root.key)

    @property
    def revocation_version(self) -> int:
        return self._revocations.version if self._revocations else 0

    def view(self) -> TrustView:
        with self._lock:
            if self._view is None:
                root = self.root_key() if self._root else None
                revoked = (
                    frozenset(self._revocations.revoked) if self._revocations else frozenset()
                )
                self._view = TrustView(
                    root_key=root, revoked=revoked, direct_keys=self._direct,
                    clock_skew=self._skew,
                )
            return self._view

    def apply_revocations(self, envelope: Envelope) -> bool:
        """Accept a newer revocation list; return False when it is not newer."""
        if self._root is None:
            raise RejectedError(
                ErrorCode.BAD_CERTIFICATE,
                "a revocation list needs a pinned root key (trust.root_key)",
            )
        revocations = verify_revocation_list(envelope, self.root_key())
        with self._lock:
            if revocations.version <= self.revocation_version:
                return False
            self._write_json("revocations.json", json.loads(envelope.model_dump_json()))
            self._revocations = revocations
            self._view = None
        logger.warning(
            "applied revocation list version %d: %d keys revoked (%s)",
            revocations.version, len(revocations.revoked), ", ".join(revocations.revoked[:10]),
        )
        return True

    def apply_chain(self, chain: RootChain) -> int:
        """Follow root rotations from the current root; return how many were accepted."""
        if self._root is None:
            return 0
        with self._lock:
            advance = advance_root(self.root_key(), self._root.version, chain)
            if advance.accepted or advance.version != self._root.version:
                self._root = RootState(
                    pinned=self._root.pinned,
                    version=advance.version,
                    key=public_key_text(advance.key),
                )
                self._write_json("root.json", self._root.__dict__)
                self._view = None
        if advance.accepted:
            logger.warning(
                "root rotated to %s at version %d", key_id_for(advance.key), advance.version
            )
        return advance.accepted

    # --- files ------------------------------------------------------------------

    def _read_root(self) -> RootState | None:
        data = self._read_json("root.json")
        if data is None:
            return None
        try:
            return RootState(pinned=data["pinned"], version=int(data["version"]), key=data["key"])
        except (KeyError, TypeError, ValueError):
            logger.error("%s is corrupt; starting again from the pinned root", self.folder / "root.json")
            return None

    def _read_revocation_envelope(self) -> Envelope | None:
        data = self._read_json("revocations.json")
        if data is None:
            return None
        try:
            return Envelope.model_validate(data)
        except ValueError:
            logger.error("%s is corrupt and ignored", self.folder / "revocations.json")
            return None

    def _read_json(self, name: str) -> dict | None:
        path = self.folder / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.error("cannot read %s: %s", path, exc)
            return None

    def _write_json(self, name: str, data: dict) -> None:
        write_atomic(self.folder / name, json.dumps(data).encode(), mode=0o600)
