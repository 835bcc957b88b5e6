"""Names of the exchanges, queues and routing keys that agents and the platform share.

Job queues are `fairu.jobs.<competition>.<queue>`; competition and queue names
contain no dots (see `Name`), so the pair can be read back from a queue name.
"""

from __future__ import annotations

JOBS_EXCHANGE = "fairu.jobs"  # direct; routing key "<competition>.<queue>"
EVENTS_EXCHANGE = "fairu.events"  # topic; status, registration and heartbeat
RESULTS_EXCHANGE = "fairu.results"  # topic; routing key "result.<job_id>"
DEAD_LETTER_EXCHANGE = "fairu.dlx"  # fanout
# Revocation lists and root chains: a fanout exchange into a stream, so every agent
# reads the whole history from the start, including what it missed while offline.
TRUST_EXCHANGE = "fairu.trust"
TRUST_STREAM = "fairu.trust.log"
DEAD_LETTER_QUEUE = "fairu.dead"
# Registrations, leases and results share one queue, so the coordinator reads an
# agent's registration before that agent's claims and results; heartbeats have a
# queue of their own.
COORDINATOR_RECORDS_QUEUE = "fairu.coordinator.records"
COORDINATOR_HEARTBEATS_QUEUE = "fairu.coordinator.heartbeats"
# The coordinator's copy of dead-lettered messages: it ends jobs that no agent can
# run and publishes again jobs that only found busy agents.
COORDINATOR_DEAD_LETTERS_QUEUE = "fairu.coordinator.dead-letters"
# The id under which the coordinator signs the results it makes itself.
COORDINATOR_ID = "fairu-coordinator"

# A message that has been delivered this many times without an ack goes to the
# dead-letter exchange instead of looping between agents.
DELIVERY_LIMIT = 5

QUEUE_PREFIX = "fairu.jobs."

# A competition's queue names are its resource classes, such as "cpu", "gpu" and
# "gpu-large". "cpu" takes jobs that request no GPU, and a class whose name starts
# with "gpu" takes jobs that request at least one.
CPU_CLASS = "cpu"
GPU_CLASS_PREFIX = "gpu"


def class_needs_gpu(queue: str) -> bool:
    return queue.startswith(GPU_CLASS_PREFIX)


def job_routing_key(competition: str, queue: str) -> str:
    return f"{competition}.{queue}"


def job_queue_name(competition: str, queue: str) -> str:
    return QUEUE_PREFIX + job_routing_key(competition, queue)


def split_job_queue_name(name: str) -> tuple[str, str]:
    """Return (competition, queue) for a job queue name; raise ValueError otherwise."""
    if not name.startswith(QUEUE_PREFIX):
        raise ValueError(f"{name!r} is not a fairu job queue")
    competition, sep, queue = name[len(QUEUE_PREFIX) :].partition(".")
    if not sep or not competition or not queue or "." in queue:
        raise ValueError(f"{name!r} is not a fairu job queue")
    return competition, queue


def job_queue_arguments() -> dict[str, object]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


def status_routing_key(job_id: str) -> str:
    return f"status.{job_id}"


def result_routing_key(job_id: str) -> str:
    return f"result.{job_id}"


def registration_routing_key(agent_id: str) -> str:
    return f"agent.registration.{agent_id}"


def heartbeat_routing_key(agent_id: str) -> str:
    return f"agent.heartbeat.{agent_id}"


def lease_routing_key(agent_id: str) -> str:
    return f"agent.lease.{agent_id}"
