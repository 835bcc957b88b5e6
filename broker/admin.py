"""`fairu-admin`: keys, queues and job submission for admins and organizers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fairu.agent.session import AmqpSession, Delivery, PublishFailed, SessionError
from fairu.logs import configure_logging, log_level_argument
from fairu.protocol.errors import ConfigError, RejectedError
from fairu.protocol.evaluation import EvaluationState
from fairu.protocol.models import (
    CancelRequest,
    Envelope,
    FinalStatus,
    JobResult,
    JobSpec,
    RootChain,
    StatusEvent,
    utc_now,
)
from fairu.protocol.signing import (
    decode_envelope,
    describe_validation,
    generate_private_key,
    key_id_for,
    load_private_key,
    load_public_key_text,
    open_unverified,
    public_key_text,
    sign_model,
    sign_payload,
    verify_envelope,
    write_private_key,
)
from fairu.protocol.trust import sign_job
from fairu.protocol.topology import (
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    RESULTS_EXCHANGE,
    TRUST_EXCHANGE,
    job_queue_name,
    job_routing_key,
    result_routing_key,
    status_routing_key,
)

from .client import (
    DEFAULT_COORDINATOR_URL,
    CoordinatorClient,
    CoordinatorError,
    follow,
    format_evaluation,
    format_evaluations,
    format_scores,
)
from .evaluation_file import load_evaluation_file
from .jobfile import load_job_file, parse_duration
from .keys import KeyFolder
from .scheduling import AgentOffer
from .sites import add_site_commands
from .store import Store
from .topology import declare_job_queue, declare_topology

ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_KEYS_DIR = Path("~/.config/fairu/keys")
DEFAULT_COORDINATOR_DB = "/var/lib/fairu/coordinator.sqlite"

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
    except (SessionError, CoordinatorError) as exc:
        print(f"fairu-admin: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValidationError as exc:
        print(f"fairu-admin: error: invalid value: {describe_validation(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as exc:
        print(f"fairu-admin: error: the coordinator database cannot be used: {exc}; pass "
              "the file given to fairu-coordinator --db", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fairu-admin: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (as with `| head`); nothing to report.
        sys.stderr.close()
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairu-admin", description=__doc__)
    parser.add_argument(
        "--log-level", default="WARNING", type=log_level_argument, help="default WARNING"
    )
    parser.add_argument(
        "--broker",
        default=os.environ.get("FAIRU_BROKER_URL", DEFAULT_BROKER_URL),
        help="AMQP URL of the broker (default: $FAIRU_BROKER_URL or the local guest URL)",
    )
    groups = parser.add_subparsers(dest="group", required=True)

    keys_group = groups.add_parser("keys", help="root key, job-signing keys, revocation")
    keys_group.add_argument(
        "--keys-dir",
        type=Path,
        default=Path(os.environ.get("FAIRU_KEYS_DIR", DEFAULT_KEYS_DIR)),
        help="the admin key folder (default: $FAIRU_KEYS_DIR or ~/.config/fairu/keys)",
    )
    keys_group.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the passphrase of the private keys",
    )
    keys = keys_group.add_subparsers(dest="action", required=True)
    init = keys.add_parser("init", help="write a bare job-signing key pair (no certificate)")
    init.add_argument(
        "--out", type=Path, help="folder for the key files (default: the --keys-dir folder)"
    )
    init.add_argument("--name", default="signing", help="file name stem (default signing)")
    init.set_defaults(handler=_keys_init)
    keys.add_parser("init-root", help="make the root key pair").set_defaults(
        handler=_keys_init_root
    )
    issue = keys.add_parser("issue", help="issue a job-signing key certified by the root")
    issue.add_argument("--valid-for", default="7d", help="certificate lifetime (default 7d)")
    issue.set_defaults(handler=_keys_issue, make_current=False)
    rotate = keys.add_parser("rotate", help="issue a new job-signing key and use it from now on")
    rotate.add_argument("--valid-for", default="7d", help="certificate lifetime (default 7d)")
    rotate.set_defaults(handler=_keys_issue, make_current=True)
    revoke = keys.add_parser("revoke", help="revoke a job-signing key on every agent")
    revoke.add_argument("key_id", help="the key id, as `keys list` prints it")
    revoke.set_defaults(handler=_keys_revoke)
    rotate_root = keys.add_parser(
        "rotate-root", help="replace the root key, signed by the current one"
    )
    rotate_root.add_argument(
        "--valid-for", default="7d", help="lifetime of the new signing key (default 7d)"
    )
    rotate_root.set_defaults(handler=_keys_rotate_root)
    keys.add_parser(
        "publish", help="publish the revocation list and root chain again"
    ).set_defaults(handler=_keys_publish)
    keys.add_parser("list", help="list job-signing keys and their state").set_defaults(
        handler=_keys_list
    )

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
    _add_signer_options(submit)
    submit.add_argument("--job-id", help="job id to use instead of a fresh one")
    submit.add_argument("--wait", action="store_true", help="show progress and the result")
    submit.add_argument(
        "--timeout", type=float, help="seconds to wait for the result (default: walltime + 600)"
    )
    submit.add_argument("--json", action="store_true", help="print the result as JSON")
    submit.add_argument(
        "--db",
        type=Path,
        default=Path(os.environ.get("FAIRU_COORDINATOR_DB", DEFAULT_COORDINATOR_DB)),
        help="coordinator database whose agent keys check the result's signature "
        f"(default: $FAIRU_COORDINATOR_DB or {DEFAULT_COORDINATOR_DB}, when it exists)",
    )
    submit.set_defaults(handler=_submit)

    _add_evaluation_commands(groups)

    cancel = groups.add_parser("cancel", help="end a job wherever it is")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="cancelled by an organizer", help="shown in the result")
    _add_signer_options(cancel)
    cancel.set_defaults(handler=_cancel)

    agents = groups.add_parser("agents", help="the fleet, approval and enrollment")
    agents.add_argument(
        "--db",
        type=Path,
        default=Path(os.environ.get("FAIRU_COORDINATOR_DB", DEFAULT_COORDINATOR_DB)),
        help="the coordinator's SQLite file (default: $FAIRU_COORDINATOR_DB or "
        f"{DEFAULT_COORDINATOR_DB})",
    )
    agent_actions = agents.add_subparsers(dest="action", required=True)
    listing = agent_actions.add_parser("list", help="list registered agents")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_agents_list)
    for action, help_text in (
        ("approve", "record this agent's results from now on"),
        ("revoke", "stop recording this agent's results"),
    ):
        command = agent_actions.add_parser(action, help=help_text)
        command.add_argument("agent_id")
        command.set_defaults(handler=_agents_set_approval, approval=f"{action}d")
    enroll = agent_actions.add_parser(
        "enroll", help="make a one-time token that approves one agent of a site"
    )
    enroll.add_argument("--site", required=True, help="the site the agent belongs to")
    enroll.set_defaults(handler=_agents_enroll)

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
    folder: Path = (args.out or args.keys_dir).expanduser()
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


def _passphrase(variable: str | None) -> bytes | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"environment variable {variable} is not set or empty")
    return value.encode()


def _key_folder(args: argparse.Namespace) -> KeyFolder:
    return KeyFolder(args.keys_dir, _passphrase(args.passphrase_env))


def _keys_init_root(args: argparse.Namespace) -> int:
    folder = _key_folder(args)
    key_id = folder.init_root()
    public = (folder.root / "root.pub").read_text().strip()
    print(f"root key id  {key_id}")
    print(f"private key  {folder.root / 'root.key'} (mode 0600; keep it offline)")
    print("site config:")
    print("  [trust]")
    print(f'  root_key = "{public}"')
    return 0


def _keys_issue(args: argparse.Namespace) -> int:
    folder = _key_folder(args)
    previous = folder.load_state().current_signing
    signing = folder.issue(parse_duration(args.valid_for), args.make_current)
    body = signing.body
    print(f"issued {body.key_id}, valid {body.not_before:%Y-%m-%d %H:%M} to "
          f"{body.not_after:%Y-%m-%d %H:%M} UTC")
    if folder.load_state().current_signing == body.key_id:
        print("new jobs are signed with it")
        if previous and previous != body.key_id:
            old = folder.signing_key(previous).body
            print(f"jobs signed by {previous} stay valid until {old.not_after:%Y-%m-%d %H:%M} UTC")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    folder = _key_folder(args)
    state = folder.load_state()
    now = utc_now()
    print(f"root version {state.root_version}, revocation list version {state.revocation_version}")
    for body in folder.signing_keys():
        if body.key_id in state.revoked:
            status = "revoked"
        elif body.not_after < now:
            status = "expired"
        elif body.key_id == state.current_signing:
            status = "current"
        else:
            status = "valid"
        print(f"{body.key_id}  {status:<8} {body.not_before:%Y-%m-%d %H:%M} to "
              f"{body.not_after:%Y-%m-%d %H:%M} UTC")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    folder = _key_folder(args)
    envelope = folder.revoke(args.key_id)
    asyncio.run(_publish_trust(args.broker, [envelope]))
    version = folder.load_state().revocation_version
    print(f"revoked {args.key_id}; published revocation list version {version}")
    return 0


def _keys_rotate_root(args: argparse.Namespace) -> int:
    folder = _key_folder(args)
    key_id, version, chain = folder.rotate_root()
    asyncio.run(_publish_trust(args.broker, [_chain_envelope(folder, chain)]))
    public = (folder.root / "root.pub").read_text().strip()
    print(f"root is now {key_id} at version {version}; published the root chain")
    # Agents that follow the chain reject certificates of the earlier root, so the
    # current signing key is replaced by one the new root certifies.
    signing = folder.issue(parse_duration(args.valid_for), make_current=True)
    print(f"issued {signing.body.key_id} under the new root; new jobs are signed with it")
    print("agents follow the chain; new site configs may pin the new root:")
    print(f'  root_key = "{public}"')
    return 0


def _keys_publish(args: argparse.Namespace) -> int:
    folder = _key_folder(args)
    messages = [_chain_envelope(folder, folder.chain())]
    revocations = folder.root / "revocations.json"
    if revocations.exists():
        messages.append(Envelope.model_validate_json(revocations.read_text()))
    asyncio.run(_publish_trust(args.broker, messages))
    print(f"published {len(messages)} trust messages")
    return 0


def _chain_envelope(folder: KeyFolder, chain: RootChain) -> Envelope:
    # Each link is verified on its own; the wrapper is signed only for uniformity.
    return sign_payload(chain.model_dump_json().encode(), folder.root_key())


async def _publish_trust(url: str, messages: list[Envelope]) -> None:
    session = await _with_session(url, "fairu-admin keys")
    try:
        for envelope in messages:
            await session.publish(
                TRUST_EXCHANGE, "", envelope.model_dump_json(exclude_none=True).encode()
            )
    finally:
        await session.close()


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


# --- agents ----------------------------------------------------------------------


def _open_store(path: Path) -> Store:
    if not path.exists():
        raise ConfigError(
            f"coordinator database {path} not found; pass the file given to "
            "fairu-coordinator --db"
        )
    return Store(path)


def _agents_list(args: argparse.Namespace) -> int:
    store = _open_store(args.db)
    try:
        agents = store.agents()
    finally:
        store.close()
    for agent in agents:
        agent["gpus_by_model"] = gpus_by_model(agent)
    if args.json:
        print(json.dumps(agents, indent=2))
        return 0
    print(format_agents(agents))
    return 0


def gpus_by_model(agent: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Count an agent's offered and free GPU units per model name."""
    offer = AgentOffer.from_row(agent)
    # An agent of the first release reports no free GPUs; count all of them as free.
    all_units = [unit.uuid for unit in offer.units]
    free = set((agent.get("free") or {}).get("gpus", all_units))
    models: dict[str, dict[str, int]] = {}
    for unit in offer.units:
        counts = models.setdefault(unit.name, {"free": 0, "total": 0})
        counts["total"] += 1
        counts["free"] += unit.uuid in free
    return models


def format_agents(agents: list[dict[str, Any]]) -> str:
    """Return the fleet as a table, one agent per row."""
    header = ("SITE", "AGENT", "APPROVAL", "STATE", "CORES FREE/TOTAL",
              "MEMORY FREE/TOTAL", "GPUS FREE/TOTAL", "RUNNING", "LAST SEEN")
    rows = [header]
    for agent in agents:
        offer = AgentOffer.from_row(agent)
        free = agent.get("free") or {}
        free_cpus = float(free.get("cpus", offer.cpus))
        free_memory = int(free.get("memory_bytes", offer.memory_bytes))
        models = agent.get("gpus_by_model") or gpus_by_model(agent)
        gpus = ", ".join(
            f"{counts['free']}/{counts['total']} {model}"
            for model, counts in models.items()
        )
        rows.append((
            str(agent["site"]),
            str(agent["agent_id"]),
            str(agent["approval"]),
            str(agent["fleet_state"]),
            f"{free_cpus:g}/{offer.cpus:g}",
            f"{free_memory / 2**30:.1f}/{offer.memory_bytes / 2**30:.1f} GiB",
            gpus or "-",
            str(len(agent["running_jobs"])),
            str(agent["last_seen"])[:19],
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [value.ljust(width) for value, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _agents_set_approval(args: argparse.Namespace) -> int:
    store = _open_store(args.db)
    try:
        changed = store.set_approval(args.agent_id, args.approval)
    finally:
        store.close()
    if not changed:
        raise ConfigError(
            f"no agent {args.agent_id} has registered; `fairu-admin agents list` shows them"
        )
    print(f"agent {args.agent_id} {args.approval}")
    return 0


def _agents_enroll(args: argparse.Namespace) -> int:
    _check_name("site", args.site)
    store = _open_store(args.db)
    try:
        token = store.add_enrollment_token(args.site)
    finally:
        store.close()
    print(f"one-time enrollment token for an agent of site {args.site}:")
    print(f"  {token}")
    print("put it in the site config as agent.enrollment_token, or in the file named by")
    print("agent.enrollment_token_file; it approves the first agent that registers with it.")
    return 0


# --- results ---------------------------------------------------------------------


def _results_show(args: argparse.Namespace) -> int:
    store = _open_store(args.db)
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


# --- evaluations -----------------------------------------------------------------


def _add_evaluation_commands(groups: Any) -> None:
    evaluate = groups.add_parser(
        "evaluate", help="sign an evaluation request and submit it to the coordinator"
    )
    evaluate.add_argument("evaluation_file", type=Path, help="evaluation request (TOML)")
    _add_coordinator_option(evaluate)
    _add_signer_options(evaluate)
    evaluate.add_argument(
        "--evaluation-id", help="evaluation id to use instead of a fresh one"
    )
    evaluate.add_argument(
        "--wait", action="store_true", help="show progress until it ends, then the scores"
    )
    evaluate.add_argument("--json", action="store_true", help="print the status as JSON")
    evaluate.set_defaults(handler=_evaluate)

    evaluations = groups.add_parser(
        "evaluations", help="evaluations the coordinator runs"
    ).add_subparsers(dest="action", required=True)
    show = evaluations.add_parser("show", help="show an evaluation and its shards")
    show.add_argument("evaluation_id")
    _add_coordinator_option(show)
    show.add_argument("--json", action="store_true", help="print the status as JSON")
    show.set_defaults(handler=_evaluations_show)
    listing = evaluations.add_parser("list", help="list every evaluation")
    _add_coordinator_option(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_evaluations_list)
    cancel = evaluations.add_parser("cancel", help="cancel an evaluation and its shards")
    cancel.add_argument("evaluation_id")
    _add_coordinator_option(cancel)
    cancel.set_defaults(handler=_evaluations_cancel)


def _add_coordinator_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        default=os.environ.get("FAIRU_COORDINATOR_URL", DEFAULT_COORDINATOR_URL),
        metavar="URL",
        help="the coordinator's HTTP API (default: $FAIRU_COORDINATOR_URL or "
        f"{DEFAULT_COORDINATOR_URL})",
    )


def _evaluate(args: argparse.Namespace) -> int:
    request = load_evaluation_file(args.evaluation_file, args.evaluation_id)
    client = CoordinatorClient(args.coordinator)
    body = _sign_as_platform(args, request)
    status = client.submit(body)
    print(
        f"submitted evaluation {status.evaluation_id}: {status.shards_total} shards "
        f"on {request.competition}.{request.queue}",
        file=sys.stderr if args.json else sys.stdout,
    )
    if args.wait:
        try:
            status = follow(client, status.evaluation_id, sys.stderr, tty=sys.stderr.isatty())
        except KeyboardInterrupt:
            print(
                f"\nfairu-admin: stopped waiting; evaluation {status.evaluation_id} goes on "
                f"(`fairu-admin evaluations show {status.evaluation_id}` follows it)",
                file=sys.stderr,
            )
            return 130
    if args.json:
        print(status.model_dump_json(indent=2))
    elif args.wait:
        print(format_evaluation(status))
    if not args.wait:
        return 0
    return 0 if status.state is EvaluationState.FINISHED else EXIT_FAILED


def _evaluations_show(args: argparse.Namespace) -> int:
    status = CoordinatorClient(args.coordinator).status(args.evaluation_id)
    print(status.model_dump_json(indent=2) if args.json else format_evaluation(status))
    return 0


def _evaluations_list(args: argparse.Namespace) -> int:
    summaries = CoordinatorClient(args.coordinator).list()
    if args.json:
        print(json.dumps([summary.model_dump(mode="json") for summary in summaries], indent=2))
    else:
        print(format_evaluations(summaries))
    return 0


def _evaluations_cancel(args: argparse.Namespace) -> int:
    status = CoordinatorClient(args.coordinator).cancel(args.evaluation_id)
    print(f"evaluation {status.evaluation_id} is {status.state.value}")
    return 0


# --- submit ----------------------------------------------------------------------


def _sign_as_platform(args: argparse.Namespace, model: BaseModel) -> bytes:
    """Sign a job or cancel request with --key, or the key folder's current key."""
    passphrase = _passphrase(args.passphrase_env)
    if args.key is not None:
        return sign_model(model, load_private_key(args.key.expanduser(), passphrase))
    signing = KeyFolder(args.keys_dir, passphrase).current_signing_key()
    if signing.body.not_after < utc_now():
        raise ConfigError(
            f"the current signing key {signing.body.key_id} expired at "
            f"{signing.body.not_after.isoformat()}; issue a new one with "
            "`fairu-admin keys rotate`"
        )
    envelope = sign_job(model.model_dump_json().encode(), signing.key, signing.certificate)
    return envelope.model_dump_json(exclude_none=True).encode()


def _add_signer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys-dir",
        type=Path,
        default=Path(os.environ.get("FAIRU_KEYS_DIR", DEFAULT_KEYS_DIR)),
        help="admin key folder whose current signing key and certificate sign the message "
        "(default: $FAIRU_KEYS_DIR or ~/.config/fairu/keys)",
    )
    parser.add_argument(
        "--key", type=Path, help="sign with this bare private key instead, without a certificate"
    )
    parser.add_argument("--passphrase-env", metavar="VAR", help="variable holding the key passphrase")


def _cancel(args: argparse.Namespace) -> int:
    request = CancelRequest(job_id=args.job_id, reason=args.reason, at=utc_now())
    body = _sign_as_platform(args, request)

    async def run() -> None:
        session = await _with_session(args.broker, "fairu-admin cancel")
        try:
            await session.publish(TRUST_EXCHANGE, "", body)
        finally:
            await session.close()

    asyncio.run(run())
    print(f"published a cancel request for job {args.job_id}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    job = load_job_file(args.job_file, args.job_id)
    body = _sign_as_platform(args, job)
    timeout = args.timeout or job.resources.walltime_s + 600
    if timeout <= 0:
        raise ConfigError(f"invalid --timeout {args.timeout}: give a positive number of seconds")
    checker = ResultChecker(args.db if args.db.is_file() else None)
    try:
        return asyncio.run(
            _submit_job(args.broker, job, body, args.wait, timeout, args.json, checker)
        )
    finally:
        checker.close()


async def _submit_job(
    url: str,
    job: JobSpec,
    body: bytes,
    wait: bool,
    timeout: float,
    as_json: bool,
    checker: "ResultChecker",
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
        return await _follow(session, messages, job, timeout, as_json, checker)
    finally:
        await session.close()


async def _follow(
    session: AmqpSession,
    messages: asyncio.Queue[Delivery],
    job: JobSpec,
    timeout: float,
    as_json: bool,
    checker: "ResultChecker",
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
        verdict = checker.check(delivery.body, result)
        if verdict == "forged":
            print(
                f"fairu-admin: ignored a result for job {job.job_id} whose signature does "
                f"not match the key of agent {result.agent_id}",
                file=sys.stderr,
            )
            continue
        if verdict == "unchecked":
            print(
                f"note: the signature of agent {result.agent_id} was not checked: it is not "
                "in a coordinator database (--db)",
                file=sys.stderr,
            )
        if as_json:
            print(result.model_dump_json(indent=2))
        else:
            print(format_result(result))
        return 0 if result.status is FinalStatus.SUCCEEDED else EXIT_FAILED


class ResultChecker:
    """Checks result signatures against the agent keys in the coordinator's database."""

    def __init__(self, database: Path | None) -> None:
        self.store = Store(database) if database is not None else None

    def check(self, body: bytes, result: JobResult) -> str:
        """Return "verified", "forged" or "unchecked" (the agent's key is unknown)."""
        if self.store is None:
            return "unchecked"
        key_text = self.store.agent_key(result.agent_id)
        if key_text is None:
            return "unchecked"
        try:
            envelope = decode_envelope(body)
            if envelope.key_id != result.agent_id:
                return "forged"
            verify_envelope(envelope, {envelope.key_id: load_public_key_text(key_text)})
        except RejectedError:
            return "forged"
        return "verified"

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


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
        lines.append("")
        lines.append(format_scores(dict(result.scores)))
    if result.status is not FinalStatus.SUCCEEDED and result.log_tail:
        lines.append("")
        lines.append("log tail:")
        lines.extend("  " + line for line in result.log_tail.splitlines()[-20:])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
