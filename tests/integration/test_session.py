"""Publisher confirms of the agent's broker session, against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from fairu.agent.session import AmqpSession, PublishFailed, SessionClosed


@pytest.fixture
async def queue(amqp: AmqpSession):
    name = f"fairu-tests-session-{uuid.uuid4().hex[:8]}"
    await amqp.declare_queue(name, durable=False, auto_delete=False)
    yield name
    await amqp.delete_queue(name)


async def test_publish_nowait_resolves_each_confirm(amqp, queue):
    bodies = [f"message {number}".encode() for number in range(200)]
    confirms = [amqp.publish_nowait("", queue, body) for body in bodies]
    await asyncio.gather(*confirms)
    assert await amqp.queue_message_count(queue) == len(bodies)

    received: list[bytes] = []
    done = asyncio.Event()

    def on_message(delivery):
        received.append(delivery.body)
        amqp.ack(delivery.delivery_tag)
        if len(received) == len(bodies):
            done.set()

    await amqp.consume(queue, on_message)
    await asyncio.wait_for(done.wait(), 30)
    # One message per publish, in order: the frames of each message go out joined.
    assert received == bodies


async def test_publish_nowait_unroutable_fails_permanently(amqp):
    confirm = amqp.publish_nowait(
        "amq.direct", f"fairu-tests-nowhere-{uuid.uuid4().hex}", b"{}", mandatory=True
    )
    with pytest.raises(PublishFailed, match="no queue is bound") as caught:
        await confirm
    assert caught.value.permanent
    # A return fails only its own message.
    await amqp.publish("amq.direct", "fairu-tests-nowhere", b"{}")


async def test_publish_nowait_on_closed_session_raises(broker_url, queue):
    session = AmqpSession(broker_url, name="fairu-tests nowait")
    await session.open()
    await session.publish("", queue, b"{}")
    await session.close()
    with pytest.raises(SessionClosed):
        session.publish_nowait("", queue, b"{}")


async def test_cancel_twice_waits_for_one_reply(amqp, queue):
    tag = await amqp.consume(queue, lambda delivery: None)
    # The first waiter is cancelled before the broker replies, as the prefetch gate's
    # task is when the agent stops. The second cancel of the tag must still return.
    first = asyncio.create_task(amqp.cancel(tag))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(amqp.cancel(tag), 10)
    assert tag not in amqp.channel.consumer_tags
    # A tag that is no longer consuming returns at once.
    await asyncio.wait_for(amqp.cancel(tag), 10)
