-- The ledger's schema: runs, tasks, chunks, attempts, the append-only event
-- log, the outbox relayed to NATS, and the idempotency record of writes.
-- States are the numbers of the stepline.api.common.v1 enums.

CREATE TABLE runs (
    run_id            text PRIMARY KEY,
    request_id        text NOT NULL,
    workflow_name     text NOT NULL,
    workflow_version  bigint NOT NULL,
    definition        bytea NOT NULL,          -- the pinned WorkflowDefinition
    state             smallint NOT NULL,
    inputs            jsonb NOT NULL DEFAULT '{}',
    labels            jsonb NOT NULL DEFAULT '{}',
    initiator_id      text NOT NULL,
    initiator_roles   text[] NOT NULL DEFAULT '{}',
    parent_run_id     text,
    parent_task_id    text,
    schedule_id       text,
    rerun_count       integer NOT NULL DEFAULT 0,
    run_timeout_s     double precision,
    create_time       timestamptz NOT NULL DEFAULT clock_timestamp(),
    start_time        timestamptz,
    end_time          timestamptz,
    update_time       timestamptz NOT NULL DEFAULT clock_timestamp(),
    failure           jsonb,
    outputs           jsonb,
    claim_executor    text,
    claim_epoch       bigint NOT NULL DEFAULT 0,
    claim_time        timestamptz,
    claim_expire      timestamptz,
    dispatch_epoch    bigint NOT NULL DEFAULT 1,
    pending_control   smallint NOT NULL DEFAULT 0,
    last_sequence     bigint NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_create_time ON runs (create_time DESC, run_id DESC);
CREATE INDEX runs_by_workflow ON runs (workflow_name, create_time DESC);
CREATE INDEX runs_by_end_time ON runs (end_time) WHERE end_time IS NOT NULL;
CREATE INDEX runs_open ON runs (state, claim_expire) WHERE state IN (1, 2);
CREATE INDEX runs_by_parent ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_labels ON runs USING gin (labels jsonb_path_ops);

CREATE TABLE tasks (
    task_id                 text PRIMARY KEY,
    run_id                  text NOT NULL REFERENCES runs (run_id),
    step_id                 text NOT NULL,
    step_path               text NOT NULL,
    ordinal                 integer NOT NULL,
    kind                    smallint NOT NULL,
    verb                    text NOT NULL DEFAULT '',
    state                   smallint NOT NULL,
    output                  jsonb,
    failure                 jsonb,
    create_time             timestamptz NOT NULL DEFAULT clock_timestamp(),
    start_time              timestamptz,
    end_time                timestamptz,
    child_run_id            text,
    child_workflow_version  bigint NOT NULL DEFAULT 0,
    approval_id             text,
    chunks_total            bigint NOT NULL DEFAULT 0,
    chunks_complete         boolean NOT NULL DEFAULT false,
    UNIQUE (run_id, ordinal)
);

CREATE TABLE chunks (
    chunk_id        text PRIMARY KEY,
    task_id         text NOT NULL REFERENCES tasks (task_id),
    run_id          text NOT NULL REFERENCES runs (run_id),
    index           bigint NOT NULL,
    record          jsonb NOT NULL,
    state           smallint NOT NULL,
    output          jsonb,
    failure         jsonb,
    create_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    start_time      timestamptz,
    end_time        timestamptz,
    claim_executor  text,
    claim_epoch     bigint NOT NULL DEFAULT 0,
    claim_time      timestamptz,
    claim_expire    timestamptz,
    dispatch_epoch  bigint NOT NULL DEFAULT 1,
    UNIQUE (task_id, index)
);
CREATE INDEX chunks_by_run ON chunks (run_id);

-- One row per attempt of a task or chunk (owner_id is the task or chunk id).
CREATE TABLE attempts (
    owner_id         text NOT NULL,
    run_id           text NOT NULL REFERENCES runs (run_id),
    task_id          text NOT NULL,
    chunk_id         text,
    attempt_number   integer NOT NULL,
    state            smallint NOT NULL,
    start_time       timestamptz NOT NULL DEFAULT clock_timestamp(),
    end_time         timestamptz,
    failure          jsonb,
    reason           text NOT NULL DEFAULT '',
    executor_id      text NOT NULL DEFAULT '',
    claim_epoch      bigint NOT NULL DEFAULT 0,
    device_serial    text NOT NULL DEFAULT '',
    device_lease_id  text NOT NULL DEFAULT '',
    PRIMARY KEY (owner_id, attempt_number)
);
CREATE INDEX attempts_by_run ON attempts (run_id);
CREATE INDEX attempts_by_end_time ON attempts (end_time) WHERE end_time IS NOT NULL;

-- The append-only event log: per-run sequence without gaps.
CREATE TABLE events (
    run_id       text NOT NULL REFERENCES runs (run_id),
    sequence     bigint NOT NULL,
    event_id     uuid NOT NULL UNIQUE,
    type         smallint NOT NULL,
    actor_id     text NOT NULL,
    actor_roles  text[] NOT NULL DEFAULT '{}',
    time         timestamptz NOT NULL DEFAULT clock_timestamp(),
    task_id      text,
    chunk_id     text,
    payload      jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, sequence)
);
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only';
END
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- Events waiting for the relay to publish them to STEPLINE_EVENTS.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    run_id        text NOT NULL,
    subject       text NOT NULL,
    body          bytea NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT clock_timestamp(),
    publish_time  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE publish_time IS NULL;

-- Wakes the relay when events are committed (delivered at commit, once per
-- statement); the relay also polls, so a missed notification only delays.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('stepline_outbox', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Idempotency: the response of every applied write, by request id.
CREATE TABLE requests (
    method        text NOT NULL,
    request_id    text NOT NULL,
    fingerprint   text NOT NULL,
    response      bytea NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (method, request_id)
);
