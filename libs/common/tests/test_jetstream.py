"""JetStream helpers against a real nats-server."""

from __future__ import annotations

import logging
from typing import Any

import nats.errors
import pytest
from google.protobuf.struct_pb2 import Struct
from nats.js.api import RetentionPolicy

from stepline.common.errors import InvalidArgument
from stepline.common.jetstream import (
    MSG_ID_HEADER,
    Streams,
    ensure_pull_consumer,
    ensure_streams,
    parse_or_term,
    publish_proto,
)
from stepline.common.testing import eventually


async def test_streams_are_created_once_and_updated_in_place(
    nats_client: Any, streams: Streams
) -> None:
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    await ensure_streams(js, streams)  # a second service starting finds them
    jobs = await js.stream_info(streams.jobs)
    events = await js.stream_info(streams.events)
    assert jobs.config.retention == RetentionPolicy.WORK_QUEUE
    assert jobs.config.subjects == [streams.subject("jobs", ">")]
    assert events.config.retention == RetentionPolicy.LIMITS


async def test_publish_with_the_same_id_is_stored_once(nats_client: Any, streams: Streams) -> None:
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    subject = streams.subject("jobs", "run")
    message = Struct()
    message.update({"run_id": "r-1"})
    first = await publish_proto(js, subject, message, msg_id="r-1:1")
    again = await publish_proto(js, subject, message, msg_id="r-1:1")
    other = await publish_proto(js, subject, message, msg_id="r-1:2")
    assert not first.duplicate
    assert again.duplicate
    assert not other.duplicate
    info = await js.stream_info(streams.jobs)
    assert info.state.messages == 2


async def test_pull_consumer_receives_the_protobuf_and_its_id(
    nats_client: Any, streams: Streams
) -> None:
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    await ensure_pull_consumer(js, stream=streams.jobs, durable="executors")
    message = Struct()
    message.update({"run_id": "r-9"})
    await publish_proto(js, streams.subject("jobs", "run"), message, msg_id="r-9:1")
    sub = await js.pull_subscribe_bind("executors", streams.jobs)
    [received] = await sub.fetch(1, timeout=5)
    decoded = Struct()
    decoded.ParseFromString(received.data)
    assert decoded["run_id"] == "r-9"
    assert received.headers is not None
    assert received.headers[MSG_ID_HEADER] == "r-9:1"
    await received.ack()


async def test_an_unreadable_message_is_terminated_and_never_delivered_again(
    nats_client: Any, streams: Streams, caplog: pytest.LogCaptureFixture
) -> None:
    js = nats_client.jetstream()
    await ensure_streams(js, streams)
    ack_wait_s = 0.5  # an unanswered message would come back this soon
    await ensure_pull_consumer(js, stream=streams.jobs, durable="executors", ack_wait_s=ack_wait_s)
    subject = streams.subject("jobs", "run")
    garbled = await js.publish(subject, b"\xff not a protobuf")
    message = Struct()
    message.update({"run_id": "r-3"})
    await publish_proto(js, subject, message, msg_id="r-3:1")
    sub = await js.pull_subscribe_bind("executors", streams.jobs)
    first, second = await sub.fetch(2, timeout=5)

    with caplog.at_level(logging.ERROR, logger="stepline.common.jetstream"):
        assert await parse_or_term(first, Struct, what="job") is None
    assert f"unreadable job on {subject}; dropped" in caplog.messages
    readable = await parse_or_term(second, Struct, what="job")
    assert readable is not None and readable["run_id"] == "r-3"
    await second.ack()

    async def settled() -> bool:
        info = await js.consumer_info(streams.jobs, "executors")
        return bool(info.ack_floor.stream_seq == garbled.seq + 1 and not info.num_ack_pending)

    await eventually(settled, what="both messages answered")
    with pytest.raises(nats.errors.TimeoutError):  # nothing came back after ack_wait
        await sub.fetch(1, timeout=3 * ack_wait_s)
    info = await js.consumer_info(streams.jobs, "executors")
    assert info.num_redelivered == 0
    assert info.delivered.consumer_seq == info.delivered.stream_seq == garbled.seq + 1


async def test_publish_without_an_id_is_refused(nats_client: Any, streams: Streams) -> None:
    with pytest.raises(InvalidArgument):
        await publish_proto(
            nats_client.jetstream(), streams.subject("jobs", "x"), Struct(), msg_id=""
        )


def test_prefixes_must_be_plain_names() -> None:
    with pytest.raises(InvalidArgument):
        Streams(prefix="a.b>")
    assert Streams(prefix="T1_").jobs == "T1_STEPLINE_JOBS"
    assert Streams(prefix="T1_").subject("jobs", "run") == "t1_.stepline.jobs.run"
