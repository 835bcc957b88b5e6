r"""Site credentials: one RabbitMQ user per site, allowed to touch only that site's queues.

The user of site NAME is `site-NAME`, with no tags, so it cannot use the management
API. Its permissions in the virtual host are:

- configure `^$`: it declares and deletes nothing.
- write `^(fairu\.events|fairu\.results)$`: it publishes status events,
  registrations, heartbeats and results. It binds no queue, because queue.bind
  needs write permission on the queue.
- read: exactly its job queues and `fairu.trust.log`, as `^(name|name|...)$`.

The read regex is the only record of a site's queues: `read_pattern` builds it
with `re.escape` and `queues_from_read_pattern` parses it back, so RabbitMQ is
the single source of truth. `docs/sites.md` explains each permission.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from pydantic import TypeAdapter, ValidationError

from fairu.agent.session import check_amqp_url
from fairu.protocol.errors import ConfigError
from fairu.protocol.models import Name
from fairu.protocol.topology import (
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    TRUST_STREAM,
    job_queue_name,
    split_job_queue_name,
)

from .management import ManagementClient, ManagementError, Permissions

logger = logging.getLogger(__name__)

SITE_USER_PREFIX = "site-"
CONFIGURE_PATTERN = "^$"
# The exit status of fairu-admin when the broker or its management API fails.
EXIT_FAILED = 1
# The management API lists a connection only after its first statistics report,
# which RabbitMQ sends every collect_statistics_interval (5 s by default).
STATISTICS_WAIT_S = 6.0

_NAME = TypeAdapter(Name)


# --- permission patterns ------------------------------------------------------------


def build_pattern(names: Iterable[str]) -> str:
    """Build a regex that matches exactly the given resource names."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def parse_pattern(pattern: str) -> list[str]:
    """Return the names in a regex made by `build_pattern`, or raise ValueError."""
    if not (pattern.startswith("^(") and pattern.endswith(")$")):
        raise ValueError(f"{pattern!r} is not of the form ^(name|...)$")
    # Escaped fairu names contain no "|" and only backslashes that escape one character.
    names = [re.sub(r"\\(.)", r"\1", part) for part in pattern[2:-2].split("|")]
    if build_pattern(names) != pattern:
        raise ValueError(f"{pattern!r} is not a list of escaped names")
    return names


WRITE_PATTERN = build_pattern([EVENTS_EXCHANGE, RESULTS_EXCHANGE])


def read_pattern(queues: Iterable[str]) -> str:
    """Build the read regex for a site's job queues (AMQP names) and the trust log."""
    return build_pattern([*sorted(set(queues)), TRUST_STREAM])


def queues_from_read_pattern(pattern: str) -> tuple[str, ...]:
    """Return the job queues in a regex made by `read_pattern`, or raise ValueError."""
    names = parse_pattern(pattern)
    queues = tuple(name for name in names if name != TRUST_STREAM)
    for name in queues:
        split_job_queue_name(name)
    if read_pattern(queues) != pattern:
        raise ValueError(
            f"{pattern!r} is not a sorted job queue list ending in the trust log"
        )
    return queues


@dataclass(frozen=True)
class SiteAccess:
    """A site and the job queues (AMQP names, sorted) its user may read in `vhost`."""

    site: str
    vhost: str
    queues: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "queues", tuple(sorted(set(self.queues))))

    @property
    def user(self) -> str:
        return site_user(self.site)

    def permissions(self) -> Permissions:
        return Permissions(
            configure=CONFIGURE_PATTERN,
            write=WRITE_PATTERN,
            read=read_pattern(self.queues),
        )

    def with_queues(self, queues: Iterable[str]) -> SiteAccess:
        return SiteAccess(self.site, self.vhost, tuple(queues))

    @classmethod
    def from_permissions(
        cls, site: str, vhost: str, permissions: Permissions
    ) -> SiteAccess:
        """Read a site's queues back from its read regex, or raise ValueError."""
        return cls(site, vhost, queues_from_read_pattern(permissions.read))


def site_user(site: str) -> str:
    return SITE_USER_PREFIX + site


def check_name(kind: str, value: str) -> None:
    try:
        _NAME.validate_python(value)
    except ValidationError:
        raise ConfigError(
            f"invalid {kind} name {value!r}: use 1 to 63 lowercase letters, digits, "
            "'_' or '-', starting with a letter or digit"
        ) from None


def parse_queue_list(text: str) -> list[str]:
    """Parse "comp.queue,comp2.queue2" into sorted job queue names, or raise ConfigError."""
    queues: list[str] = []
    for item in text.split(","):
        item = item.strip()
        competition, dot, queue = item.partition(".")
        if not dot:
            raise ConfigError(
                f"invalid entry {item!r} in --queues: use COMPETITION.QUEUE, "
                "e.g. higgsml.cpu, and separate entries with commas"
            )
        check_name("competition", competition)
        check_name("queue", queue)
        queues.append(job_queue_name(competition, queue))
    return sorted(set(queues))


def short_queue_name(amqp_name: str) -> str:
    """Return "competition.queue", the --queues form of a job queue name."""
    competition, queue = split_job_queue_name(amqp_name)
    return f"{competition}.{queue}"


# --- the site config snippet ----------------------------------------------------------


def site_broker_url(admin_url: str, user: str, password: str, vhost: str) -> str:
    """Build the site's AMQP URL from the scheme, host and port of the admin's URL."""
    try:
        check_amqp_url(admin_url)
    except ValueError as exc:
        raise ConfigError(f"the broker URL in --broker {exc}") from None
    parts = urlsplit(admin_url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid port in the broker URL {parts.hostname}") from None
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return (
        f"{parts.scheme or 'amqp'}://{quote(user, safe='')}:{quote(password, safe='')}"
        f"@{netloc}/{quote(vhost, safe='')}"
    )


def config_snippet(access: SiteAccess, url: str) -> str:
    lines = [
        f"# Broker settings of site {access.site}, from `fairu-admin sites add`.",
        "# This is the only time the password is shown: RabbitMQ keeps only its hash.",
        "# The host is the one in fairu-admin --broker; use the address the site reaches",
        "# the broker at, and amqps:// across networks.",
        "[broker]",
        f'url = "{url}"',
    ]
    for name in access.queues:
        competition, queue = split_job_queue_name(name)
        lines += [
            "",
            "[[queues]]",
            f'competition = "{competition}"',
            f'name = "{queue}"',
        ]
    return "\n".join(lines)


# --- command-line actions ---------------------------------------------------------


def add_site_commands(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    queue_actions: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add `sites add|remove|list` to fairu-admin's groups and `assign|unassign` to `queues`."""
    management = _management_options()
    sites = groups.add_parser(
        "sites", help="per-site broker credentials"
    ).add_subparsers(dest="action", required=True)

    add = sites.add_parser(
        "add",
        parents=[management],
        help="create a site's broker user and print its config",
    )
    add.add_argument("name", help="site name, as in site.name of the site config")
    add.add_argument(
        "--queues",
        metavar="LIST",
        help="comma-separated COMPETITION.QUEUE list, e.g. higgsml.cpu,higgsml.gpu; "
        "required for a new site, optional with --rotate-password",
    )
    add.add_argument("--vhost", default="/", help="virtual host (default /)")
    add.add_argument(
        "--rotate-password",
        action="store_true",
        help="give an existing site a new password and close its open connections",
    )
    add.set_defaults(handler=_command(_sites_add))

    remove = sites.add_parser(
        "remove",
        parents=[management],
        help="delete a site's broker user and its connections",
    )
    remove.add_argument("name", help="site name")
    remove.set_defaults(handler=_command(_sites_remove))

    listing = sites.add_parser(
        "list", parents=[management], help="list the sites and the queues each may read"
    )
    listing.add_argument("--vhost", default="/", help="virtual host (default /)")
    listing.set_defaults(handler=_command(_sites_list))

    for action, help_text, run in (
        ("assign", "let a site read a job queue", _queues_assign),
        (
            "unassign",
            "stop a site reading a job queue and close its connections",
            _queues_unassign,
        ),
    ):
        parser = queue_actions.add_parser(action, parents=[management], help=help_text)
        parser.add_argument("name", help="queue name, e.g. cpu")
        parser.add_argument("--competition", required=True, help="competition name")
        parser.add_argument("--site", required=True, help="site name")
        parser.add_argument("--vhost", default="/", help="virtual host (default /)")
        parser.set_defaults(handler=_command(run))


def _management_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("management API")
    group.add_argument(
        "--mgmt-url",
        metavar="URL",
        default=None,
        help="RabbitMQ management API URL (default: $FAIRU_MGMT_URL or http://127.0.0.1:15672)",
    )
    group.add_argument(
        "--mgmt-user",
        metavar="USER",
        default=None,
        help="admin user with the administrator tag (default: $FAIRU_MGMT_USER or guest); "
        "its password comes from $FAIRU_MGMT_PASSWORD (default guest), never from the "
        "command line, where other local users could read it",
    )
    return options


Action = Callable[[argparse.Namespace, ManagementClient], Awaitable[int]]


def _command(action: Action) -> Callable[[argparse.Namespace], int]:
    """Wrap an async action in a fairu-admin handler that owns the management client."""

    def handler(args: argparse.Namespace) -> int:
        async def run() -> int:
            async with ManagementClient(args.mgmt_url, args.mgmt_user) as api:
                return await action(args, api)

        try:
            return asyncio.run(run())
        except ManagementError as exc:
            print(f"fairu-admin: error: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return handler


def _note(message: str) -> None:
    # Progress goes to stderr, so stdout carries only the config snippet.
    print(message, file=sys.stderr)


async def _sites_add(args: argparse.Namespace, api: ManagementClient) -> int:
    check_name("site", args.name)
    queues = parse_queue_list(args.queues) if args.queues is not None else None
    user = site_user(args.name)
    await _require_vhost(api, args.vhost)

    exists = await api.get_user(user) is not None
    if exists and not args.rotate_password:
        raise ConfigError(
            f"site {args.name} already exists (RabbitMQ user {user}); pass --rotate-password "
            "to give it a new password, or change its queues with `fairu-admin queues "
            "assign` and `fairu-admin queues unassign`"
        )
    if not exists and args.rotate_password:
        raise ConfigError(
            f"site {args.name} does not exist (no RabbitMQ user {user}), so it has no "
            "password to rotate; run the command without --rotate-password to create it"
        )
    if queues is None:
        if not exists:
            raise ConfigError(
                f"--queues is required for the new site {args.name}, e.g. --queues higgsml.cpu"
            )
        queues = list((await _load_access(api, args.name, args.vhost)).queues)
    await _require_queues(api, args.vhost, queues)

    access = SiteAccess(args.name, args.vhost, tuple(queues))
    password = secrets.token_urlsafe(32)
    await api.put_user(user, password)
    try:
        await api.set_permissions(args.vhost, user, access.permissions())
    except ManagementError:
        if not exists:
            # Leave no half-made site: a user without permissions confuses `sites list`.
            await api.delete_user(user)
        raise

    if exists:
        _note(f"gave site {args.name} (user {user}) a new password")
        closed = await _disconnect(api, user, None, "the site's password was rotated")
        _note(f"closed {closed} connections that used the old password")
    else:
        _note(
            f"created site {args.name}: RabbitMQ user {user} in virtual host {args.vhost}"
        )
    shown = ", ".join(short_queue_name(name) for name in access.queues)
    _note(f"queues: {shown or 'none'}")
    url = site_broker_url(args.broker, user, password, args.vhost)
    print(config_snippet(access, url))
    return 0


async def _sites_remove(args: argparse.Namespace, api: ManagementClient) -> int:
    check_name("site", args.name)
    user = site_user(args.name)
    if not await api.delete_user(user):
        raise ConfigError(
            f"site {args.name} does not exist (no RabbitMQ user {user}); "
            "`fairu-admin sites list` shows the sites"
        )
    print(
        f"removed site {args.name}: deleted RabbitMQ user {user}, which closed its connections"
    )
    return 0


async def _sites_list(args: argparse.Namespace, api: ManagementClient) -> int:
    users = await api.list_users(name_prefix=SITE_USER_PREFIX)
    if not users:
        print(f"no sites: no RabbitMQ user is named {SITE_USER_PREFIX}*")
        return 0
    rows = [("site", "queues in virtual host " + args.vhost)]
    for user in sorted(users, key=lambda user: user.name):
        site = user.name[len(SITE_USER_PREFIX) :]
        rows.append((site, await _describe_access(api, site, args.vhost)))
    width = max(len(site) for site, _ in rows)
    for site, queues in rows:
        print(f"{site:<{width}}  {queues}")
    return 0


async def _describe_access(api: ManagementClient, site: str, vhost: str) -> str:
    permissions = await api.get_permissions(vhost, site_user(site))
    if permissions is None:
        return "(no permissions in this virtual host)"
    try:
        access = SiteAccess.from_permissions(site, vhost, permissions)
    except ValueError:
        return f"(read permission not written by fairu-admin: {permissions.read})"
    text = ", ".join(short_queue_name(name) for name in access.queues) or "(none)"
    if (permissions.configure, permissions.write) != (CONFIGURE_PATTERN, WRITE_PATTERN):
        text += "  (configure or write permission changed outside fairu-admin)"
    return text


async def _queues_assign(args: argparse.Namespace, api: ManagementClient) -> int:
    queue = _queue_argument(args)
    access = await _load_access(api, args.site, args.vhost)
    if queue in access.queues:
        print(f"site {args.site} already reads {queue}; nothing changed")
        return 0
    await _require_queues(api, args.vhost, [queue])
    updated = access.with_queues([*access.queues, queue])
    await api.set_permissions(args.vhost, updated.user, updated.permissions())
    print(
        f"site {args.site} may now read {queue}; add it to [[queues]] in the site config"
    )
    return 0


async def _queues_unassign(args: argparse.Namespace, api: ManagementClient) -> int:
    queue = _queue_argument(args)
    access = await _load_access(api, args.site, args.vhost)
    if queue not in access.queues:
        assigned = ", ".join(short_queue_name(name) for name in access.queues) or "none"
        raise ConfigError(
            f"site {args.site} does not read {queue}; its queues are: {assigned}"
        )
    updated = access.with_queues(name for name in access.queues if name != queue)
    await api.set_permissions(args.vhost, updated.user, updated.permissions())
    print(f"site {args.site} may no longer read {queue}")
    # RabbitMQ checks permissions when a consumer starts, so a consumer that is
    # already running keeps receiving until its connection closes.
    closed = await _disconnect(
        api, updated.user, args.vhost, f"read access to {queue} was withdrawn"
    )
    print(
        f"closed {closed} connections of {updated.user}; remove the queue from [[queues]] "
        "in the site config, or the agent cannot subscribe when it reconnects"
    )
    return 0


def _queue_argument(args: argparse.Namespace) -> str:
    check_name("site", args.site)
    check_name("competition", args.competition)
    check_name("queue", args.name)
    return job_queue_name(args.competition, args.name)


async def _load_access(api: ManagementClient, site: str, vhost: str) -> SiteAccess:
    user = site_user(site)
    permissions = await api.get_permissions(vhost, user)
    if permissions is None:
        if await api.get_user(user) is None:
            raise ConfigError(
                f"site {site} does not exist (no RabbitMQ user {user}); create it with "
                f"`fairu-admin sites add {site} --queues COMPETITION.QUEUE`"
            )
        raise ConfigError(
            f"site {site} has no permissions in virtual host {vhost}; pass the site's "
            f"--vhost, or set them with `fairu-admin sites add {site} --rotate-password "
            f"--vhost {vhost} --queues COMPETITION.QUEUE`"
        )
    try:
        return SiteAccess.from_permissions(site, vhost, permissions)
    except ValueError:
        raise ConfigError(
            f"the read permission of {user} in virtual host {vhost} was not written by "
            f"fairu-admin ({permissions.read!r}); set it again with `fairu-admin sites add "
            f"{site} --rotate-password --queues COMPETITION.QUEUE,...`"
        ) from None


async def _require_vhost(api: ManagementClient, vhost: str) -> None:
    if not await api.vhost_exists(vhost):
        raise ConfigError(
            f"virtual host {vhost!r} does not exist; create it with "
            f"`rabbitmqctl add_vhost {vhost}` or pass another --vhost"
        )


async def _require_queues(
    api: ManagementClient, vhost: str, queues: Iterable[str]
) -> None:
    missing = [name for name in queues if not await api.queue_exists(vhost, name)]
    if not missing:
        return
    fixes = []
    for name in missing:
        competition, queue = split_job_queue_name(name)
        fixes.append(f"`fairu-admin queues create {queue} --competition {competition}`")
    if len(missing) == 1:
        problem = (
            f"queue {missing[0]} does not exist in virtual host {vhost}; create it"
        )
    else:
        problem = f"queues {', '.join(missing)} do not exist in virtual host {vhost}; create them"
    raise ConfigError(f"{problem} with {' and '.join(fixes)}")


async def _disconnect(
    api: ManagementClient, user: str, vhost: str | None, reason: str
) -> int:
    """Close the user's connections (in `vhost`, or all); return how many were closed.

    A second pass after the statistics interval catches connections that opened
    just before the change and were not listed yet. It may also close a connection
    that the agent opened again in between, which then reconnects once more.

    NOTE: on a broker whose collect_statistics_interval is above STATISTICS_WAIT_S,
    a connection opened just before the change can miss both passes.
    """
    closed = 0
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(STATISTICS_WAIT_S)
        for connection in await api.list_connections(user=user, vhost=vhost):
            if await api.close_connection(connection.name, reason):
                logger.info(
                    "closed connection %s of %s: %s", connection.name, user, reason
                )
                closed += 1
    return closed
