"""Fetch job inputs by URL into a cache addressed by sha256, and unpack bundles.

    cache/sha256/<digest>     the verified file, mode 0644
    cache/unpacked/<digest>/  its extracted tree, for inputs with unpack = "tar"
    cache/unpacked/<digest>.zip/  the same for unpack = "zip"

A file enters the cache only after its digest and size match the job spec, so a
cache hit needs no re-download and no re-hash. Hashing, writing and extraction run
in threads. `unpack` describes what a bundle may contain.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fairu.protocol.errors import ErrorCode, JobError, RetryableError
from fairu.protocol.models import InputSpec

from .unpack import UnpackLimits, extract_bundle

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
FETCH_ATTEMPTS = 3
RETRY_DELAY_S = 1.0


class InputCache:
    """The input cache and the HTTP client that fills it.

    aiohttp is imported and its client made at the first download, because most
    jobs have no inputs to fetch and the library is a fifth of an idle agent's memory.
    """

    def __init__(self, root: Path, unpack_limits: UnpackLimits | None = None) -> None:
        self.unpack_limits = unpack_limits or UnpackLimits()
        self.files = root / "sha256"
        self.unpacked = root / "unpacked"
        self.partial = root / "partial"
        for folder in (self.files, self.unpacked, self.partial):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o755)
        self._session: aiohttp.ClientSession | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def materialize(self, spec: InputSpec, job_id: str) -> Path:
        """Return a host path holding the input, fetching and unpacking it if needed."""
        lock = self._locks.setdefault(spec.sha256, asyncio.Lock())
        async with lock:
            path = self.files / spec.sha256
            if path.exists():
                logger.info("job %s input %s: cache hit %s", job_id, spec.name, spec.sha256[:12])
                # The digest matched, so only a wrong declared size can differ; fail as
                # a download would, whichever agent already has the file.
                size = (await asyncio.to_thread(path.stat)).st_size
                _check_digest(spec, size, spec.sha256)
            else:
                await self._fetch_with_retry(spec, job_id, path)
            if spec.unpack != "none":
                return await self._unpack(spec, path)
            return path

    async def _fetch_with_retry(self, spec: InputSpec, job_id: str, path: Path) -> None:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                await self._fetch(spec, job_id, path)
                return
            except RetryableError as exc:
                if attempt == FETCH_ATTEMPTS:
                    raise JobError(exc.code, exc.message) from None
                delay = RETRY_DELAY_S * 2 ** (attempt - 1)
                logger.warning(
                    "job %s input %s: fetch attempt %d of %d failed (%s); retrying in %.1f s",
                    job_id, spec.name, attempt, FETCH_ATTEMPTS, exc.message, delay,
                )
                await asyncio.sleep(delay)

    async def _fetch(self, spec: InputSpec, job_id: str, path: Path) -> None:
        import aiohttp

        temporary = self.partial / f"{spec.sha256}.{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        received = 0
        logger.info("job %s input %s: fetching %s", job_id, spec.name, spec.url)
        try:
            async with self._http().get(spec.url) as response:
                if response.status >= 500:
                    raise RetryableError(
                        ErrorCode.INPUT_FETCH_FAILED,
                        f"input {spec.name!r}: {spec.url} returned HTTP {response.status}",
                    )
                if response.status != 200:
                    raise JobError(
                        ErrorCode.INPUT_FETCH_FAILED,
                        f"input {spec.name!r}: {spec.url} returned HTTP {response.status}",
                    )
                with open(temporary, "wb") as handle:
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        received += len(chunk)
                        if received > spec.size:
                            raise JobError(
                                ErrorCode.INPUT_DIGEST_MISMATCH,
                                f"input {spec.name!r}: {spec.url} sent more than the "
                                f"declared {spec.size} bytes",
                            )
                        await asyncio.to_thread(_write_and_hash, handle, digest, chunk)
                    await asyncio.to_thread(_flush, handle)
            _check_digest(spec, received, digest.hexdigest())
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(
                ErrorCode.INPUT_FETCH_FAILED,
                f"input {spec.name!r}: fetching {spec.url} failed: {exc or type(exc).__name__}",
            ) from None
        finally:
            temporary.unlink(missing_ok=True)
        logger.info("job %s input %s: fetched %d bytes", job_id, spec.name, received)

    async def _unpack(self, spec: InputSpec, archive: Path) -> Path:
        # The same bytes may be unpacked as tar by one job and as zip by another.
        name = spec.sha256 if spec.unpack == "tar" else f"{spec.sha256}.{spec.unpack}"
        target = self.unpacked / name
        if not target.exists():
            await asyncio.to_thread(
                extract_bundle,
                archive,
                target,
                spec.unpack,
                spec.name,
                self.unpack_limits,
            )
        return target


def _write_and_hash(handle: object, digest: "hashlib._Hash", chunk: bytes) -> None:
    handle.write(chunk)  # type: ignore[attr-defined]
    digest.update(chunk)


def _flush(handle: object) -> None:
    handle.flush()  # type: ignore[attr-defined]
    os.fsync(handle.fileno())  # type: ignore[attr-defined]


def _check_digest(spec: InputSpec, received: int, actual: str) -> None:
    if received != spec.size:
        raise JobError(
            ErrorCode.INPUT_DIGEST_MISMATCH,
            f"input {spec.name!r}: received {received} bytes, the job declares {spec.size}",
        )
    if actual != spec.sha256:
        raise JobError(
            ErrorCode.INPUT_DIGEST_MISMATCH,
            f"input {spec.name!r}: sha256 is {actual}, the job declares {spec.sha256}",
        )
