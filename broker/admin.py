"""`fairu-admin`: keys, queues and job submission for admins and organizers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from fairu.agent.session import AmqpSession, Delivery, PublishFailed, SessionError
from fairu.logs import configure_logging
from fairu.protocol.errors import ConfigError, RejectedError
from fairu.protocol.models import FinalStatus, JobResult, JobSpec, StatusEvent
from fairu.protocol.signing import (
    generate_private_key,
    key_id_for,
    load_private_key,
    open_unverified,
    public_key_text,
    sign_model,
    write_private_key,
)
from fairu.protocol.topology import (
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    RESULTS_EXCHANGE,
    job_queue_name,
    job_routing_key,
    result_routing_key,
    status_routing_key,
)

from .jobfile import load_job_file
from .sites import add_site_commands
from .topology import declare_job_queue, declare_topology

ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_KEYS_DIR = Path("~/.config/fairu/keys")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"fairu-admin: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SessionError as exc:
        print(f"fairu-admin: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairu-admin", description=__doc__)
    parser.add_argument("--log-level", default="WARNING", help="default WARNING")
    parser.add_argument(
        "--broker",
        default=os.environ.get("FAIRU_BROKER_URL", DEFAULT_BROKER_URL),
        help="AMQP URL of the broker (default: $FAIRU_BROKER_URL or the local guest URL)",
    )
    groups = parser.add_subparsers(dest="group", required=True)

    keys = groups.add_parser("keys", help="job-signing keys").add_subparsers(
        dest="action", required=True
    )
    init = keys.add_parser("init", help="write a new job-signing key pair")
    init.add_argument("--out", type=Path, default=DEFAULT_KEYS_DIR, help="folder for the key files")
    init.add_argument("--name", default="signing", help="file name stem (default signing)")
    init.set_defaults(handler=_keys_init)

    topology = groups.add_parser("topology", help="exchanges and platform queues")
    topology.add_subparsers(dest="action", required=True).add_parser(
        "declare", help="declare the exchanges and platform queues (idempotent)"
    ).set_defaults(handler=_topology_declare)

    queues = groups.add_parser("queues", help="competition job queues").add_subparsers(
        dest="action", required=True
    )
    create = queues.add_parser("create", help="create a job queue for a competition")
    create.add_argument("name", help="queue name, e.g. cpu")
    create.add_argument("--competition", required=True, help="competition name")
    create.set_defaults(handler=_queues_create)
    add_site_commands(groups, queues)

    submit = groups.add_parser("submit", help="sign and publish a job file")
    submit.add_argument("job_file", type=Path, help="job description (TOML)")
    submit.add_argument(
        "--key",
        type=Path,
        default=Path(os.environ.get("FAIRU_SIGNING_KEY", DEFAULT_KEYS_DIR / "signing.key")),
        help="private signing key (default: $FAIRU_SIGNING_KEY or ~/.config/fairu/keys/signing.key)",
    )
    submit.add_argument("--job-id", help="job id to use instead of a fresh one")
    submit.add_argument("--wait", action="store_true", help="show progress and the result")
    submit.add_argument(
        "--timeout", type=float, help="seconds to wait for the result (default: walltime + 600)"
    )
    submit.add_argument("--json", action="store_true", help="print the result as JSON")
    submit.set_defaults(handler=_submit)

    results = groups.add_parser("results", help="results recorded by the coordinator")
    show = results.add_subparsers(dest="action", required=True).add_parser(
        "show", help="show the recorded final result of a job"
    )
    show.add_argument("job_id")
    show.add_argument("--db", type=Path, required=True, help="the coordinator's SQLite file")
    show.set_defaults(handler=_results_show)
    return parser


# --- keys ------------------------------------------------------------------------


def _keys_init(args: argparse.Namespace) -> int:
    folder: Path = args.out.expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    private_path = folder / f"{args.name}.key"
    public_path = folder / f"{args.name}.pub"
    write_private_key(private_path, key)
    text = public_key_text(key.public_key())
    public_path.write_text(text + "\n")
    print(f"key id       {key_id_for(key.public_key())}")
    print(f"private key  {private_path} (mode 0600; keep it on the admin host)")
    print(f"public key   {public_path}")
    print("site config:")
    print("  [trust]")
    print(f'  signing_keys = ["{text}"]')
    return 0


# --- topology and queues ---------------------------------------------------------


async def _with_session(url: str, name: str) -> AmqpSession:
    session = AmqpSession(url, name=name)
    await session.open()
    await declare_topology(session)
    return session


def _topology_declare(args: argparse.Namespace) -> int:
    async def run() -> None:
        session = await _with_session(args.broker, "fairu-admin topology")
        await session.close()

    asyncio.run(run())
    print("declared the fairu exchanges and platform queues")
    return 0


def _queues_create(args: argparse.Namespace) -> int:
    _check_name("queue", args.name)
    _check_name("competition", args.competition)

    async def run() -> str:
        session = await _with_session(args.broker, "fairu-admin queues")
        try:
            return await declare_job_queue(session, args.competition, args.name)
        finally:
            await session.close()

    name = asyncio.run(run())
    print(f"queue {name} ready for competition {args.competition}")
    return 0


def _check_name(kind: str, value: str) -> None:
    from fairu.protocol.models import Name

    class Probe(BaseModel):
        name: Name

    try:
        Probe(name=value)
    except ValidationError:
        raise ConfigError(
            f"invalid {kind} name {value!r}: use 1 to 63 lowercase letters, digits, "
            "'_' or '-', starting with a letter or digit"
        ) from None


# --- results ---------------------------------------------------------------------


def _results_show(args: argparse.Namespace) -> int:
    from .store import Store

    if not args.db.exists():
        raise ConfigError(f"coordinator database {args.db} not found; pass the file given to "
                          "fairu-coordinator --db")
    store = Store(args.db)
    try:
        stored = store.result(args.job_id)
        repeats = store.audit_count(args.job_id)
    finally:
        store.close()
    if stored is None:
        print(f"no result recorded for job {args.job_id}", file=sys.stderr)
        return EXIT_FAILED
    print(f"job          {stored.job_id}")
    print(f"status       {stored.status}")
    print(f"agent        {stored.agent_id} (site {stored.site})")
    print(f"recorded at  {stored.recorded_at} UTC")
    print(f"repeats      {repeats} later results kept for audit")
    for name, value in stored.scores.items():
        print(f"  {name:<20} {value:.6g}")
    return 0


# --- submit ----------------------------------------------------------------------


def _submit(args: argparse.Namespace) -> int:
    job = load_job_file(args.job_file, args.job_id)
    key = load_private_key(args.key.expanduser())
    timeout = args.timeout or job.resources.walltime_s + 600
    return asyncio.run(_submit_job(args.broker, job, key, args.wait, timeout, args.json))


async def _submit_job(
    url: str, job: JobSpec, key: object, wait: bool, timeout: float, as_json: bool
) -> int:
    session = await _with_session(url, "fairu-admin submit")
    try:
        messages: asyncio.Queue[Delivery] = asyncio.Queue()
        if wait:
            # Bind before publishing, so no status event or result can be missed.
            queue = await session.declare_queue("", durable=False, exclusive=True, auto_delete=True)
            await session.bind(queue, EVENTS_EXCHANGE, status_routing_key(job.job_id))
            await session.bind(queue, RESULTS_EXCHANGE, result_routing_key(job.job_id))
            await session.consume(queue, messages.put_nowait)
        body = sign_model(job, key)  # type: ignore[arg-type]
        try:
            await session.publish(
                JOBS_EXCHANGE,
                job_routing_key(job.competition, job.queue),
                body,
                mandatory=True,
            )
        except PublishFailed as exc:
            if exc.permanent:
                raise ConfigError(
                    f"no queue {job_queue_name(job.competition, job.queue)} exists; create "
                    f"it with `fairu-admin queues create {job.queue} --competition "
                    f"{job.competition}`"
                ) from None
            raise
        print(f"submitted job {job.job_id} to {job_queue_name(job.competition, job.queue)}")
        if not wait:
            return 0
        return await _follow(session, messages, job, timeout, as_json)
    finally:
        await session.close()


async def _follow(
    session: AmqpSession,
    messages: asyncio.Queue[Delivery],
    job: JobSpec,
    timeout: float,
    as_json: bool,
) -> int:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            delivery = await asyncio.wait_for(messages.get(), max(remaining, 0.001))
        except TimeoutError:
            print(
                f"fairu-admin: no result for job {job.job_id} within {timeout:.0f} s; it may "
                "still be queued or running",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        session.ack(delivery.delivery_tag)
        if delivery.exchange == EVENTS_EXCHANGE:
            event = _read(delivery.body, StatusEvent)
            if event:
                print(f"{event.at:%H:%M:%S}  {event.state.value:<15} on {event.agent_id}")
            continue
        result = _read(delivery.body, JobResult)
        if result is None:
            continue
        if as_json:
            print(result.model_dump_json(indent=2))
        else:
            print(format_result(result))
        return 0 if result.status is FinalStatus.SUCCEEDED else EXIT_FAILED


def _read(body: bytes, model: type[ModelT]) -> ModelT | None:
    try:
        return open_unverified(body, model)
    except RejectedError as exc:
        print(f"fairu-admin: ignored an unreadable message: {exc}", file=sys.stderr)
        return None


def format_result(result: JobResult) -> str:
    rows = [
        ("job", result.job_id),
        ("status", result.status.value),
        ("agent", f"{result.agent_id} (site {result.site})"),
        ("exit code", "-" if result.exit_code is None else str(result.exit_code)),
        (
            "duration",
            f"{result.durations.total_s:.1f} s (fetch {result.durations.fetch_s:.1f} s, "
            f"run {result.durations.run_s:.1f} s)",
        ),
    ]
    if result.error:
        rows.append(("error", f"{result.error.code}: {result.error.message}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if result.scores:
        score_width = max(len(name) for name in result.scores)
        lines.append("")
        lines.append(f"{'score':<{score_width}}  value")
        for name, value in result.scores.items():
            lines.append(f"{name:<{score_width}}  {value:.6g}")
    if result.status is not FinalStatus.SUCCEEDED and result.log_tail:
        lines.append("")
        lines.append("log tail:")
        lines.extend("  " + line for line in result.log_tail.splitlines()[-20:])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
