"""The raw pika ceiling: consume a job, publish its result with a confirm, then ack.

It does the broker work of a fairu job and nothing else: no signature check, no
parsing, no job record, no spool. The job id comes from the message_id property. The
result is published persistent, and the job's delivery is acked only once the broker
confirms the result, as the agent does. Usage:

    raw_worker.py URL QUEUE RESULTS_EXCHANGE PREFETCH
"""

from __future__ import annotations

import json
import signal
import sys

import pika
import pika.channel
import pika.frame
import pika.spec


class RawWorker:
    def __init__(self, url: str, queue: str, results_exchange: str, prefetch: int) -> None:
        self.params = pika.URLParameters(url)
        self.params.client_properties = {"connection_name": "fairu bench raw worker"}
        self.queue = queue
        self.results_exchange = results_exchange
        self.prefetch = prefetch
        self.channel: pika.channel.Channel | None = None
        # Publish sequence number of each result, to the delivery tag of its job.
        self.unconfirmed: dict[int, int] = {}
        self.publish_sequence = 0
        self.connection = pika.SelectConnection(
            self.params,
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, error: sys.exit(f"raw worker: {error}"),
            on_close_callback=lambda _c, _reason: self.connection.ioloop.stop(),
        )

    def run(self) -> None:
        self.connection.ioloop.start()

    def stop(self) -> None:
        self.connection.ioloop.add_callback_threadsafe(self.connection.close)

    def _on_channel(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        channel.basic_qos(prefetch_count=self.prefetch, callback=lambda _f: self._consume())

    def _consume(self) -> None:
        assert self.channel is not None
        self.channel.basic_consume(self.queue, self._on_job)
        print("raw worker serving", flush=True)

    def _on_job(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        _body: bytes,
    ) -> None:
        job_id = properties.message_id
        result = json.dumps({"job_id": job_id, "status": "succeeded", "scores": {}}).encode()
        self.publish_sequence += 1
        self.unconfirmed[self.publish_sequence] = method.delivery_tag
        channel.basic_publish(
            self.results_exchange,
            f"result.{job_id}",
            result,
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
        )

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        assert self.channel is not None
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            sys.exit("raw worker: the broker nacked a result")
        if method.multiple:
            sequences = [s for s in self.unconfirmed if s <= method.delivery_tag]
        else:
            sequences = [method.delivery_tag]
        for sequence in sequences:
            delivery_tag = self.unconfirmed.pop(sequence, None)
            if delivery_tag is not None:
                self.channel.basic_ack(delivery_tag)


def main() -> None:
    url, queue, results_exchange, prefetch = sys.argv[1:5]
    worker = RawWorker(url, queue, results_exchange, int(prefetch))
    signal.signal(signal.SIGTERM, lambda _s, _f: worker.stop())
    worker.run()


if __name__ == "__main__":
    main()
