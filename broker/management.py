"""An async client for the parts of the RabbitMQ management HTTP API that fairu uses.

It covers users, permissions, the existence of virtual hosts and queues, and
connections. The API URL and the admin account come from the arguments, else from
$FAIRU_MGMT_URL, $FAIRU_MGMT_USER and $FAIRU_MGMT_PASSWORD, else from the local
defaults (http://127.0.0.1:15672, guest/guest). Requests and their statuses are
logged at DEBUG without headers or bodies, so no password reaches a log.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from fairu.protocol.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:15672"
DEFAULT_USER = "guest"
DEFAULT_PASSWORD = "guest"
ENABLE_PLUGIN_COMMAND = "rabbitmq-plugins enable rabbitmq_management"


class ManagementError(Exception):
    """A failed management API request, with its HTTP `status` if a response arrived."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Permissions:
    """The configure, write and read regexes of one user in one virtual host."""

    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class User:
    name: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Connection:
    name: str
    user: str
    vhost: str


class ManagementClient:
    """A session with the management API; use it as an async context manager."""

    def __init__(
        self,
        url: str | None = None,
        user: str | None = None,
        password: str | None = None,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = (url or os.environ.get("FAIRU_MGMT_URL") or DEFAULT_URL).rstrip("/")
        parts = urlsplit(self.url)
        if parts.username is not None or parts.password is not None:
            # Not echoed, since it contains a password; error messages show self.url.
            raise ConfigError(
                "the management API URL must not contain credentials; set "
                "FAIRU_MGMT_USER and FAIRU_MGMT_PASSWORD instead"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"invalid management API URL {self.url!r}: use http://HOST:PORT, "
                f"for example {DEFAULT_URL}"
            )
        self.user = user or os.environ.get("FAIRU_MGMT_USER") or DEFAULT_USER
        self._password = (
            password or os.environ.get("FAIRU_MGMT_PASSWORD") or DEFAULT_PASSWORD
        )
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ManagementClient(url={self.url!r}, user={self.user!r})"

    async def __aenter__(self) -> Self:
        # aiohttp 3.14 deprecates BasicAuth, so build the header, which any version sends.
        credentials = base64.b64encode(
            f"{self.user}:{self._password}".encode()
        ).decode()
        self._http = aiohttp.ClientSession(
            headers={"Authorization": f"Basic {credentials}"}, timeout=self._timeout
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- users ------------------------------------------------------------------

    async def put_user(
        self, name: str, password: str, tags: tuple[str, ...] = ()
    ) -> bool:
        """Create the user or replace its password and tags; return True if it was created."""
        body = {"password": password, "tags": ",".join(tags)}
        status, _ = await self._request("PUT", ["users", name], body)
        return status == 201

    async def get_user(self, name: str) -> User | None:
        status, data = await self._request("GET", ["users", name], allow_missing=True)
        return None if status == 404 else _user(data)

    async def delete_user(self, name: str) -> bool:
        """Delete the user; return False if it did not exist.

        RabbitMQ 3.10 closes the user's open connections when it deletes the user.
        """
        status, _ = await self._request("DELETE", ["users", name], allow_missing=True)
        return status != 404

    async def list_users(
        self, *, name_prefix: str = "", tag: str | None = None
    ) -> list[User]:
        """List the users whose names start with `name_prefix` and that have `tag`, if given."""
        _, data = await self._request("GET", ["users"])
        users = [_user(entry) for entry in data]
        return [
            user
            for user in users
            if user.name.startswith(name_prefix) and (tag is None or tag in user.tags)
        ]

    # --- permissions ------------------------------------------------------------

    async def set_permissions(
        self, vhost: str, user: str, permissions: Permissions
    ) -> None:
        body = {
            "configure": permissions.configure,
            "write": permissions.write,
            "read": permissions.read,
        }
        await self._request("PUT", ["permissions", vhost, user], body)

    async def get_permissions(self, vhost: str, user: str) -> Permissions | None:
        """Return the user's permissions in `vhost`, or None if it has none there."""
        status, data = await self._request(
            "GET", ["permissions", vhost, user], allow_missing=True
        )
        if status == 404:
            return None
        return Permissions(
            configure=data["configure"], write=data["write"], read=data["read"]
        )

    # --- virtual hosts, queues and connections ----------------------------------

    async def vhost_exists(self, vhost: str) -> bool:
        status, _ = await self._request("GET", ["vhosts", vhost], allow_missing=True)
        return status != 404

    async def queue_exists(self, vhost: str, name: str) -> bool:
        status, _ = await self._request(
            "GET", ["queues", vhost, name], allow_missing=True
        )
        return status != 404

    async def list_connections(
        self, *, user: str | None = None, vhost: str | None = None
    ) -> list[Connection]:
        """List open AMQP connections, optionally only those of `user` in `vhost`.

        The list comes from the management statistics, so a connection opened within
        the last statistics interval (5 s by default) may be missing from it.
        """
        _, data = await self._request("GET", ["connections"])
        connections = [
            Connection(
                name=entry["name"],
                user=entry.get("user", ""),
                vhost=entry.get("vhost", ""),
            )
            for entry in data
        ]
        return [
            connection
            for connection in connections
            if (user is None or connection.user == user)
            and (vhost is None or connection.vhost == vhost)
        ]

    async def close_connection(self, name: str, reason: str) -> bool:
        """Close a connection, giving `reason` to its client; return False if it was gone."""
        status, _ = await self._request(
            "DELETE",
            ["connections", name],
            headers={"X-Reason": reason},
            allow_missing=True,
        )
        return status != 404

    # --- transport --------------------------------------------------------------

    async def _request(
        self,
        method: str,
        segments: list[str],
        body: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        allow_missing: bool = False,
    ) -> tuple[int, Any]:
        """Send one request and return (status, decoded JSON body or None).

        Raise `ManagementError` for a failed connection and for every error status
        except 404 when `allow_missing` is set.
        """
        if self._http is None:
            raise RuntimeError(
                "use ManagementClient as `async with ManagementClient(...)`"
            )
        # Every segment is percent-encoded whole, so the virtual host "/" becomes %2F.
        path = "/api/" + "/".join(quote(segment, safe="") for segment in segments)
        target = URL(self.url + path, encoded=True)
        try:
            async with self._http.request(
                method, target, json=body, headers=headers
            ) as response:
                status = response.status
                text = await response.text()
        except aiohttp.ClientConnectorError as exc:
            error = exc.os_error
            # asyncio puts "Connect call failed" in strerror, so name the errno instead.
            if error.errno and error.errno > 0:
                detail = os.strerror(error.errno)
            else:
                detail = error.strerror or str(error)
            raise ManagementError(
                f"cannot connect to the RabbitMQ management API at {self.url} ({detail}); "
                f"check that RabbitMQ runs there with the management plugin enabled "
                f"(`{ENABLE_PLUGIN_COMMAND}`), or set FAIRU_MGMT_URL"
            ) from None
        except TimeoutError:
            raise ManagementError(
                f"{method} {path} to the RabbitMQ management API at {self.url} timed out "
                f"after {self._timeout.total:.0f} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise ManagementError(
                f"{method} {self.url}{path} failed: {exc or type(exc).__name__}"
            ) from None
        logger.debug("management API %s %s: HTTP %d", method, path, status)

        data = _json_or_none(text)
        if status < 300 and method == "GET" and data is None:
            raise ManagementError(
                f"{self.url}{path} returned HTTP {status} without a JSON body; check that "
                "FAIRU_MGMT_URL points at the RabbitMQ management API"
            )
        if status < 300 or (status == 404 and allow_missing):
            return status, data
        raise self._status_error(method, path, status, data, text)

    def _status_error(
        self, method: str, path: str, status: int, data: Any, text: str
    ) -> ManagementError:
        reason = _reason(data, text)
        if status == 401 and "administrator" in reason.lower():
            return ManagementError(
                f"the management API at {self.url} rejected {method} {path}: user "
                f"{self.user!r} does not have the administrator tag; use an admin account "
                "in FAIRU_MGMT_USER and FAIRU_MGMT_PASSWORD",
                status=status,
            )
        if status == 401:
            return ManagementError(
                f"the management API at {self.url} rejected the admin credentials of user "
                f"{self.user!r} ({reason}); set FAIRU_MGMT_USER and FAIRU_MGMT_PASSWORD "
                "to an account with the administrator tag",
                status=status,
            )
        return ManagementError(
            f"the management API at {self.url} returned HTTP {status} for {method} {path}: "
            f"{reason}",
            status=status,
        )


def _user(data: dict[str, Any]) -> User:
    # RabbitMQ 3.10 returns tags as a list, and older releases as one "a,b" string.
    tags = data.get("tags") or []
    if isinstance(tags, str):
        tags = [tag for tag in tags.split(",") if tag]
    return User(name=data["name"], tags=tuple(tags))


def _json_or_none(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _reason(data: Any, text: str) -> str:
    if isinstance(data, dict) and "reason" in data:
        reason = data["reason"]
        return reason if isinstance(reason, str) else repr(reason)
    if data is None and text.strip():
        # RabbitMQ sends its errors as JSON, so another body means another server.
        return (
            "the body is not JSON; check that FAIRU_MGMT_URL points at the RabbitMQ "
            "management API"
        )
    return text.strip()[:300] or "no reason given"
