"""NATS JetStream helpers: connecting, stream and consumer setup, protobuf publish.

Two streams carry Stepline's traffic:

* ``STEPLINE_JOBS`` — a work queue of jobs for executors (``stepline.jobs.>``);
  each message is removed once an executor acks it.
* ``STEPLINE_EVENTS`` — the record of state changes published from the ledger's
  outbox (``stepline.events.>``), kept for watchers and other services.

Publishes carry ``Nats-Msg-Id`` so a retried publish inside the stream's
duplicate window is stored once. A :class:`Streams` value can carry a prefix so
that tests (or tenants sharing a cluster) get their own streams and subjects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

import nats
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from stepline.common.errors import InvalidArgument

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
CONTENT_TYPE_HEADER = "Content-Type"

M = TypeVar("M", bound=Message)


def content_type(message_type: type[Message]) -> str:
    """The Content-Type header of a message carrying a ``message_type``."""
    return f"application/protobuf; proto={message_type.DESCRIPTOR.full_name}"


@dataclass(frozen=True, kw_only=True)
class Streams:
    """Names of Stepline's streams and subjects, optionally namespaced by ``prefix``."""

    prefix: str = ""
    duplicate_window_s: float = 120.0
    events_max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.prefix and not self.prefix.replace("_", "").isalnum():
            raise InvalidArgument(f"stream prefix must be letters, digits or _: {self.prefix!r}")

    @property
    def jobs(self) -> str:
        return f"{self.prefix.upper()}STEPLINE_JOBS"

    @property
    def events(self) -> str:
        return f"{self.prefix.upper()}STEPLINE_EVENTS"

    def subject(self, *parts: str) -> str:
        """A subject under this namespace, e.g. ``subject("jobs", "run")``."""
        base = f"{self.prefix.lower()}.stepline" if self.prefix else "stepline"
        return ".".join((base, *parts))

    def stream_configs(self) -> list[StreamConfig]:
        return [
            StreamConfig(
                name=self.jobs,
                description="Stepline jobs for executors (work queue)",
                subjects=[self.subject("jobs", ">")],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=self.duplicate_window_s,
            ),
            StreamConfig(
                name=self.events,
                description="Stepline run, task, approval and device events",
                subjects=[self.subject("events", ">")],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                duplicate_window=self.duplicate_window_s,
                max_age=self.events_max_age_s,
            ),
        ]


async def connect(url: str, *, name: str) -> NATS:
    """Connect to NATS with reconnects that never give up while the process runs."""
    return await nats.connect(
        servers=[url],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
    )


async def ensure_streams(js: JetStreamContext, streams: Streams) -> None:
    """Create Stepline's streams, or bring an existing one's config up to date."""
    for config in streams.stream_configs():
        assert config.name is not None
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            log.info("created stream %s", config.name)
        else:
            await js.update_stream(config)


async def ensure_pull_consumer(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subject: str | None = None,
    ack_wait_s: float = 30.0,
    max_ack_pending: int = 1000,
) -> None:
    """Create (or update) a durable pull consumer with explicit acks.

    ``ack_wait_s`` is how long a message may go without an ack or an in-progress
    signal before JetStream hands it to another consumer.
    """
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_ack_pending=max_ack_pending,
            filter_subject=filter_subject,
        ),
    )


async def publish_proto(
    js: JetStreamContext,
    subject: str,
    message: Message,
    *,
    msg_id: str,
    timeout_s: float = 5.0,
) -> PubAck:
    """Publish a protobuf message with ``Nats-Msg-Id`` for deduplication.

    Returns the stream's ack; ``ack.duplicate`` is true when the stream already
    held a message with this id (the publish was a harmless retry).
    """
    if not msg_id:
        raise InvalidArgument("msg_id is required for a deduplicated publish")
    headers = {
        MSG_ID_HEADER: msg_id,
        CONTENT_TYPE_HEADER: content_type(type(message)),
    }
    return await js.publish(
        subject, message.SerializeToString(), timeout=timeout_s, headers=headers
    )


async def parse_or_term(msg: Msg, message_type: type[M], *, what: str) -> M | None:
    """The ``message_type`` that ``msg`` carries; or, if its data is unreadable,
    None after logging the drop (``what`` names the message: "job", "event")
    and terminating ``msg``, so that JetStream never delivers it again."""
    message = message_type()
    try:
        message.ParseFromString(msg.data)
    except DecodeError:
        log.error("unreadable %s on %s; dropped", what, msg.subject)
        await msg.term()
        return None
    return message
