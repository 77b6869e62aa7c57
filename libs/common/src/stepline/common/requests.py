"""Idempotent requests: telling a replay of a request from a conflicting reuse
of its ``request_id``.

Every mutating Stepline RPC carries a ``request_id``. A service stores the
request's :func:`fingerprint` with its effect; a later call with the same
``request_id`` and the same fingerprint is a replay (answered as before), one
with another fingerprint is a conflict (refused).
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

#: fields that are not part of what a request asks to be done: its id, and the
#: view its answer is shaped in (a replay asking another view is the same request)
UNFINGERPRINTED = ("request_id", "view")


def fingerprint(request: Message, *extra: str) -> str:
    """SHA-256 (hex) of ``request`` without the fields of :data:`UNFINGERPRINTED`,
    serialized deterministically, followed by each of ``extra`` (e.g. the
    caller's id, when the same request from someone else is a different
    request)."""
    copy = type(request)()
    copy.CopyFrom(request)
    for name in UNFINGERPRINTED:
        if name in copy.DESCRIPTOR.fields_by_name:
            copy.ClearField(name)
    digest = hashlib.sha256(copy.SerializeToString(deterministic=True))
    for value in extra:
        digest.update(b"\0" + value.encode("utf-8"))
    return digest.hexdigest()
