"""The Celery 5 baseline: a no-op task with the same broker work as a fairu job.

The worker consumes a durable quorum queue with fairu's queue arguments, with
acks_late, so a job is acked only after its task returns. The task publishes its
result itself, persistent and with a publisher confirm (kombu's confirm_publish), to a
topic exchange bound like fairu's results exchange. That is the path of a fairu result
without the spool and the signature. Celery's own result backends are not used. The
rpc backend of Celery 5.7 sends each result into a classic reply queue of the client,
as a transient message unless result_persistent is set, which is cheaper than the
quorum-queue write that a fairu result costs. Settings come from the environment:

    FAIRU_BENCH_BROKER_URL          AMQP URL
    FAIRU_BENCH_CELERY_QUEUE        the job queue, declared by the benchmark
    FAIRU_BENCH_CELERY_EXCHANGE     the direct exchange the queue is bound to
    FAIRU_BENCH_RESULTS_EXCHANGE    where results go, routing key result.<job_id>
    FAIRU_BENCH_PREFETCH_MULTIPLIER worker_prefetch_multiplier (default 4)
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

from fairu.protocol.models import utc_now

TASK_NAME = "fairu_bench.noop"

_queue_name = os.environ.get("FAIRU_BENCH_CELERY_QUEUE", "fairu-bench-unset")
_exchange = Exchange(
    os.environ.get("FAIRU_BENCH_CELERY_EXCHANGE", "fairu-bench-unset"), "direct", durable=True
)
RESULTS_EXCHANGE = os.environ.get("FAIRU_BENCH_RESULTS_EXCHANGE", "fairu-bench-unset")

app = Celery("fairu_bench", broker=os.environ.get("FAIRU_BENCH_BROKER_URL"))
app.conf.update(
    task_acks_late=True,
    task_default_delivery_mode="persistent",
    task_ignore_result=True,
    task_queues=[
        Queue(
            _queue_name,
            _exchange,
            routing_key=_queue_name,
            durable=True,
            # The same arguments as a fairu job queue, without its dead-letter
            # exchange, which belongs to fairu.
            queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": 5},
        )
    ],
    task_default_queue=_queue_name,
    worker_prefetch_multiplier=int(os.environ.get("FAIRU_BENCH_PREFETCH_MULTIPLIER", "4")),
    # No remote control, events or gossip: they declare broker objects of their own
    # and add traffic that the agent does not have.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"confirm_publish": True},
)


@app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
def noop(job: dict[str, object]) -> dict[str, object]:
    """Publish a succeeded result for `job` with a confirm, and return it."""
    job_id = job["job_id"]
    result: dict[str, object] = {
        "job_id": job_id,
        "status": "succeeded",
        "scores": {},
        "finished_at": utc_now().isoformat(),
    }
    with app.producer_or_acquire() as producer:
        producer.publish(
            result,
            exchange=RESULTS_EXCHANGE,
            routing_key=f"result.{job_id}",
            serializer="json",
            delivery_mode=2,
            retry=False,
        )
    return result
