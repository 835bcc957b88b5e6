"""An asyncio face on pika's AsyncioConnection: one connection, one channel, confirms.

pika reports everything through callbacks on the event loop. This module turns each
request into an awaitable and every publish into one that resolves only when the
broker confirms it. When the connection or channel closes, every pending awaitable
fails with `SessionClosed` and `closed` resolves, so the owner can reconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from fairu.protocol.errors import ConfigError

logger = logging.getLogger(__name__)


class SessionError(Exception):
    """A broker session failed; `permanent` is true when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class SessionClosed(SessionError):
    """The connection or channel closed while a request was pending."""


class PublishFailed(SessionError):
    """The broker nacked a publish, or returned it as unroutable."""


@dataclass(frozen=True)
class Delivery:
    queue: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: BasicProperties
    body: bytes

    @property
    def delivery_count(self) -> int:
        """Return how often a quorum queue has delivered this message before."""
        headers = self.properties.headers or {}
        count = headers.get("x-delivery-count", 0)
        return count if isinstance(count, int) else 0


DeliveryHandler = Callable[[Delivery], None]


@dataclass(frozen=True)
class _Pending:
    """A publish waiting for its confirm."""

    future: asyncio.Future[None]
    message_id: str
    exchange: str
    routing_key: str


class _JoinedFramesConnection(AsyncioConnection):
    """An AsyncioConnection that writes the frames of one message in one piece.

    pika hands each frame of a message (method, header, body) to the transport on
    its own, and the transport sends each with its own `send` call, so a publish
    costs three system calls where one does. The override is of a pika 1.x internal
    that every message and method frame passes through.
    """

    def _output_marshaled_frames(self, marshaled_frames: Sequence[bytes]) -> None:
        if len(marshaled_frames) < 2:
            super()._output_marshaled_frames(marshaled_frames)
            return
        data = b"".join(marshaled_frames)
        self.bytes_sent += len(data)
        self.frames_sent += len(marshaled_frames)
        self._adapter_emit_data(data)


def check_amqp_url(url: str) -> None:
    """Raise ValueError, without quoting the URL and its password, unless pika can use it."""
    if not url.startswith(("amqp://", "amqps://")):
        raise ValueError("must start with amqp:// or amqps://")
    try:
        pika.URLParameters(url)
    except (ValueError, IndexError, TypeError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "no virtual host"
        raise ValueError(
            f"is not a valid AMQP URL ({reason}); use amqp://USER:PASSWORD@HOST:PORT/VHOST, "
            "with %2F for the default virtual host"
        ) from None


def amqp_url_argument(url: str) -> str:
    """Check a --broker value for argparse, which then prints the error and exits 2."""
    try:
        check_amqp_url(url)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"the broker URL {exc}") from None
    return url


def redact_url(url: str) -> str:
    """Return the AMQP URL with its password replaced, for log lines and errors."""
    params = pika.URLParameters(url)
    vhost = params.virtual_host
    return (
        f"amqp://{params.credentials.username}:***@{params.host}:{params.port}/"
        f"{'%2F' if vhost == '/' else vhost}"
    )


class AmqpSession:
    def __init__(self, url: str, *, name: str, heartbeat_s: int = 30) -> None:
        try:
            check_amqp_url(url)
        except ValueError as exc:
            raise ConfigError(f"the broker URL {exc}") from None
        self.url = url
        self.name = name
        self._params = pika.URLParameters(url)
        self._params.heartbeat = heartbeat_s
        self._params.client_properties = {"connection_name": name}
        self._params.connection_attempts = 1
        self._params.socket_timeout = 10
        self._connection: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed: asyncio.Future[str] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        # CancelOk replies still expected, by consumer tag.
        self._cancelling: dict[str, asyncio.Future[Any]] = {}
        self._confirms: dict[int, _Pending] = {}
        self._returned: set[str] = set()
        self._tags = itertools.count(1)
        # Set when the broker closed the channel with ACCESS_REFUSED (403), which no
        # reconnect can fix: the credentials lack a permission.
        self.access_refused = False

    # --- lifecycle --------------------------------------------------------------

    async def open(self, timeout_s: float = 15.0) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.closed = loop.create_future()
        opened: asyncio.Future[None] = loop.create_future()

        def on_open(_connection: AsyncioConnection) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_connection: AsyncioConnection, error: Any) -> None:
            if not opened.done():
                opened.set_exception(_open_error(self.url, error))

        self._connection = _JoinedFramesConnection(
            self._params,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=loop,
        )
        try:
            await asyncio.wait_for(opened, timeout_s)
        except TimeoutError:
            self._connection.close()
            raise SessionError(
                f"timed out after {timeout_s:.0f} s connecting to {redact_url(self.url)}"
            ) from None

        channel_open: asyncio.Future[Channel] = loop.create_future()
        self._connection.channel(on_open_callback=channel_open.set_result)
        self._channel = await asyncio.wait_for(channel_open, timeout_s)
        self._channel.add_on_close_callback(self._on_channel_closed)
        self._channel.add_on_return_callback(self._on_return)
        confirm_ok = self._request()
        self._channel.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=_resolver(confirm_ok)
        )
        await confirm_ok
        logger.info("broker session %s open to %s", self.name, redact_url(self.url))

    @property
    def is_open(self) -> bool:
        return self.closed is not None and not self.closed.done()

    async def close(self) -> None:
        if self._connection is None or self.closed is None:
            return
        if not self._connection.is_closed and not self._connection.is_closing:
            self._connection.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), 10)
        except TimeoutError:
            logger.warning("broker session %s did not close within 10 s", self.name)
        # pika closes the socket in callbacks scheduled after the close callback.
        await asyncio.sleep(0.05)

    def _on_connection_closed(self, _connection: Any, reason: Exception) -> None:
        self._fail_all(f"connection closed: {reason}")

    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == 403:
            self.access_refused = True
        self._fail_all(f"channel closed: {reason}")
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _fail_all(self, why: str) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(why)
        error = SessionClosed(f"broker session {self.name}: {why}")
        confirms = [pending.future for pending in self._confirms.values()]
        for future in list(self._pending) + confirms:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._confirms.clear()

    # --- requests ---------------------------------------------------------------

    def _request(self) -> asyncio.Future[Any]:
        if not self.is_open or self._channel is None:
            raise SessionClosed(f"broker session {self.name} is not open")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    @property
    def channel(self) -> Channel:
        if self._channel is None or not self.is_open:
            raise SessionClosed(f"broker session {self.name} is not open")
        return self._channel

    async def declare_exchange(self, name: str, kind: str, durable: bool = True) -> None:
        done = self._request()
        self.channel.exchange_declare(
            exchange=name, exchange_type=kind, durable=durable, callback=_resolver(done)
        )
        await done

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> str:
        """Declare a queue and return its name (the broker's name when `name` is "")."""
        done = self._request()
        self.channel.queue_declare(
            queue=name,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            arguments=arguments,
            callback=_resolver(done),
        )
        frame = await done
        return str(frame.method.queue)

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        done = self._request()
        self.channel.queue_bind(
            queue=queue, exchange=exchange, routing_key=routing_key, callback=_resolver(done)
        )
        await done

    async def delete_queue(self, name: str) -> None:
        done = self._request()
        self.channel.queue_delete(queue=name, callback=_resolver(done))
        await done

    async def queue_exists(self, name: str) -> bool:
        return await self.queue_message_count(name) is not None

    async def queue_message_count(self, name: str) -> int | None:
        """Return a queue's message count, or None when it does not exist.

        The check runs on a throwaway channel, since a failed passive declare closes it.
        """
        assert self._connection is not None and self._loop is not None
        loop = self._loop
        opened: asyncio.Future[Channel] = loop.create_future()
        self._connection.channel(on_open_callback=opened.set_result)
        probe = await asyncio.wait_for(opened, 10)
        answer: asyncio.Future[int | None] = loop.create_future()

        def on_close(_channel: Channel, _reason: Exception) -> None:
            if not answer.done():
                answer.set_result(None)

        def on_ok(frame: Any) -> None:
            if not answer.done():
                answer.set_result(int(frame.method.message_count))

        probe.add_on_close_callback(on_close)
        probe.queue_declare(queue=name, passive=True, callback=on_ok)
        count = await asyncio.wait_for(answer, 10)
        if probe.is_open:
            probe.close()
        return count

    async def set_prefetch(self, count: int) -> None:
        done = self._request()
        self.channel.basic_qos(prefetch_count=count, callback=_resolver(done))
        await done

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> str:
        done = self._request()

        def on_message(
            _channel: Channel, method: Basic.Deliver, properties: BasicProperties, body: bytes
        ) -> None:
            handler(
                Delivery(
                    queue=queue,
                    delivery_tag=method.delivery_tag,
                    redelivered=method.redelivered,
                    exchange=method.exchange,
                    routing_key=method.routing_key,
                    properties=properties,
                    body=body,
                )
            )

        tag = self.channel.basic_consume(
            queue=queue,
            on_message_callback=on_message,
            exclusive=exclusive,
            arguments=arguments,
            callback=_resolver(done),
        )
        await done
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        """Cancel a consumer and wait for the broker's CancelOk.

        pika ignores a second basic_cancel of a tag that is still being cancelled and
        never calls its callback, so a second call waits for the first call's reply.
        The reply is shielded, because the first caller may be cancelled meanwhile.
        """
        if not self.is_open:
            return
        done = self._cancelling.get(consumer_tag)
        if done is None:
            if consumer_tag not in self.channel.consumer_tags:
                return
            done = self._request()
            self._cancelling[consumer_tag] = done
            done.add_done_callback(lambda _done: self._cancelling.pop(consumer_tag, None))
            self.channel.basic_cancel(consumer_tag=consumer_tag, callback=_resolver(done))
        await asyncio.shield(done)

    def ack(self, delivery_tag: int) -> bool:
        """Ack one delivery; return False when the channel that carried it is gone."""
        if not self.is_open or self._channel is None:
            return False
        self._channel.basic_ack(delivery_tag=delivery_tag)
        return True

    def nack(self, delivery_tag: int, requeue: bool) -> bool:
        if not self.is_open or self._channel is None:
            return False
        self._channel.basic_nack(delivery_tag=delivery_tag, requeue=requeue)
        return True

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        mandatory: bool = False,
        persistent: bool = True,
        headers: dict[str, Any] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        """Publish and wait for the broker's confirm; raise `PublishFailed` otherwise."""
        tag, confirmed = self._send(exchange, routing_key, body, mandatory, persistent, headers)
        try:
            await asyncio.wait_for(confirmed, timeout_s)
        except TimeoutError:
            self._confirms.pop(tag, None)
            raise PublishFailed(
                f"no confirm from the broker within {timeout_s:.0f} s for a message "
                f"to {exchange!r} with routing key {routing_key!r}"
            ) from None

    def publish_nowait(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        mandatory: bool = False,
        persistent: bool = True,
    ) -> asyncio.Future[None]:
        """Publish and return the future of the broker's confirm without waiting for it.

        The future fails with `PublishFailed` on a nack or a return and with
        `SessionClosed` when the session closes first. Confirms of many messages in
        flight at once cost one round trip in all instead of one each.
        """
        return self._send(exchange, routing_key, body, mandatory, persistent, None)[1]

    def _send(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        mandatory: bool,
        persistent: bool,
        headers: dict[str, Any] | None,
    ) -> tuple[int, asyncio.Future[None]]:
        channel = self.channel
        assert self._loop is not None
        message_id = uuid.uuid4().hex
        properties = BasicProperties(
            content_type="application/json",
            delivery_mode=2 if persistent else 1,
            message_id=message_id,
            headers=headers,
        )
        confirmed: asyncio.Future[None] = self._loop.create_future()
        tag = next(self._tags)
        self._confirms[tag] = _Pending(confirmed, message_id, exchange, routing_key)
        channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=mandatory,
        )
        return tag, confirmed

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        tags = (
            [tag for tag in self._confirms if tag <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            pending = self._confirms.pop(tag, None)
            if pending is None or pending.future.done():
                continue
            if not acked:
                pending.future.set_exception(
                    PublishFailed("the broker rejected the message (nack)")
                )
            elif pending.message_id in self._returned:
                self._returned.discard(pending.message_id)
                pending.future.set_exception(
                    PublishFailed(
                        f"no queue is bound to {pending.exchange!r} for routing key "
                        f"{pending.routing_key!r}",
                        permanent=True,
                    )
                )
            else:
                pending.future.set_result(None)

    def _on_return(
        self, _channel: Channel, _method: Any, properties: BasicProperties, _body: bytes
    ) -> None:
        # A return always arrives before the confirm of the same message.
        if properties.message_id:
            self._returned.add(properties.message_id)


def _resolver(future: asyncio.Future[Any]) -> Callable[[Any], None]:
    def resolve(frame: Any) -> None:
        if not future.done():
            future.set_result(frame)

    return resolve


def _open_error(url: str, error: Any) -> SessionError:
    where = redact_url(url)
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return SessionError(
            f"the broker at {where} rejected the credentials; check the user and "
            "password in the broker URL",
            permanent=True,
        )
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return SessionError(
            f"access denied on {where}: the virtual host does not exist or the user "
            "has no permission on it",
            permanent=True,
        )
    detail = str(error) or repr(error)
    return SessionError(
        f"cannot connect to the broker at {where} ({detail[:300]}); check that "
        "RabbitMQ runs there and that the broker URL is right"
    )
