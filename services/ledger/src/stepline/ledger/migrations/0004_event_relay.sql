-- The relay publishes the event log itself instead of a copy of each event in
-- `outbox`, and task and chunk transitions keep their idempotency record on
-- their first event instead of a row in `requests`: a transition writes its
-- events once. (Stop ledger replicas of an older build before this migration:
-- they write `outbox`, which it drops.)

-- xid: the transaction that appended the event. The relay reads events in
-- (xid, run_id, sequence) order, and only those of transactions older than
-- every transaction still in progress (pg_snapshot_xmin of its snapshot), so
-- no event can commit later behind its cursor (see stepline.ledger.relay).
-- envelope: a serialized stepline.api.events.v1.Event holding the event's typed
-- payload (its oneof), if it has one; the relay completes it from the row.
-- request_fingerprint, response: the idempotency record of the task or chunk
-- transition that appended the event, on its first event, whose event_id is
-- derived from the run, the method and the request_id (stepline.ledger.unit).
ALTER TABLE events
    ADD COLUMN xid xid8,
    ADD COLUMN envelope bytea,
    ADD COLUMN request_fingerprint text,
    ADD COLUMN response bytea;
-- Set apart from ADD COLUMN, so that existing rows keep NULL: they are not
-- relayed again (except those still waiting in the outbox, below).
ALTER TABLE events ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX events_relay ON events (xid, run_id, sequence);

-- A run's events are appended in transaction order, the relay's order: a
-- writer that waited for a run's lock while another ledger replica appended
-- to its log (a newer transaction, committed first) must not append after
-- it. It fails with serialization_failure instead, to be retried.
CREATE FUNCTION ledger_check_append_order(p_run_id text, p_previous bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM events WHERE run_id = p_run_id AND sequence = p_previous
               AND xid > pg_current_xact_id()) THEN
        RAISE EXCEPTION 'event % of run % was appended by a newer transaction',
            p_previous, p_run_id
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN true;
END
$$;

-- What a batch of task and chunk transitions reads of their runs
-- (stepline.ledger.unit): the claim and the log's sequence, without the
-- pinned definition and the inputs, which may be large (TOASTed).
CREATE VIEW run_claims AS
    SELECT run_id, state, claim_executor, claim_epoch, claim_expire, last_sequence, update_time
    FROM runs;

-- The relay's cursor: the last event published, in the relay's order.
CREATE TABLE relay_position (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    xid          xid8 NOT NULL,
    run_id       text NOT NULL,
    sequence     bigint NOT NULL,
    update_time  timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO relay_position (xid, run_id, sequence) VALUES ('0', '', 0);

-- Events still waiting in the outbox are relayed from the log: this
-- transaction's xid puts them after the cursor, and their published body is
-- a complete envelope.
ALTER TABLE events DISABLE TRIGGER events_append_only;
UPDATE events e SET xid = pg_current_xact_id(), envelope = o.body
FROM outbox o
WHERE o.event_id = e.event_id AND o.publish_time IS NULL;
ALTER TABLE events ENABLE TRIGGER events_append_only;

DROP TABLE outbox;
DROP FUNCTION outbox_notify();
