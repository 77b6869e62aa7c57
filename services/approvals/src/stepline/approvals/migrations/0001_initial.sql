-- The approvals service's schema: approval requests and their decisions,
-- webhook subscriptions and deliveries (with every attempt), seen inbound
-- deliveries, kept responses of mutating RPCs, and two outboxes (events for
-- NATS, decisions for the ledger).
-- States and outcomes are the numbers of the stepline.api.approvals.v1 enums.

CREATE TABLE approvals (
    approval_id          text PRIMARY KEY,
    request_id           text NOT NULL UNIQUE,
    fingerprint          text NOT NULL,
    run_id               text NOT NULL,
    task_id              text NOT NULL,
    step_id              text NOT NULL,
    workflow_name        text NOT NULL,
    labels               jsonb NOT NULL DEFAULT '{}',
    state                smallint NOT NULL,
    policy               bytea NOT NULL,          -- the ApprovalPolicy as given
    approver_principals  text[] NOT NULL,
    approver_roles       text[] NOT NULL,
    required_approvals   integer NOT NULL,
    allow_initiator      boolean NOT NULL,
    context              jsonb NOT NULL DEFAULT '{}',
    initiator_id         text NOT NULL,
    initiator_roles      text[] NOT NULL DEFAULT '{}',
    create_time          timestamptz NOT NULL,
    expire_time          timestamptz,
    decide_time          timestamptz,
    closed_by            text,                    -- who expired or cancelled it
    close_reason         text                     -- and why (not a decision)
);
CREATE INDEX approvals_by_create_time ON approvals (create_time DESC, approval_id DESC);
CREATE INDEX approvals_by_run ON approvals (run_id);
CREATE INDEX approvals_due ON approvals (expire_time) WHERE state = 1 AND expire_time IS NOT NULL;

CREATE TABLE decisions (
    decision_id   uuid PRIMARY KEY,
    approval_id   text NOT NULL REFERENCES approvals (approval_id),
    actor_id      text NOT NULL,
    actor_roles   text[] NOT NULL DEFAULT '{}',
    outcome       smallint NOT NULL,
    reason        text NOT NULL,
    channel       smallint NOT NULL,
    decide_time   timestamptz NOT NULL,
    state_after   smallint NOT NULL
);
CREATE INDEX decisions_by_approval ON decisions (approval_id, decide_time);

-- Responses of mutating RPCs by request_id, for idempotent replays.
CREATE TABLE requests (
    method       text NOT NULL,
    request_id   text NOT NULL,
    fingerprint  text NOT NULL,
    response     bytea NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (method, request_id)
);

-- Delivery ids of inbound decision webhooks, written with the decision.
CREATE TABLE inbound_deliveries (
    delivery_id   text PRIMARY KEY,
    approval_id   text NOT NULL,
    actor_id      text NOT NULL,
    receive_time  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Events to publish to STEPLINE_EVENTS (body: a serialized events.v1.Event).
CREATE TABLE event_outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    subject       text NOT NULL,               -- below `stepline.events.`
    body          bytea NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT clock_timestamp(),
    publish_time  timestamptz
);
CREATE INDEX event_outbox_pending ON event_outbox (id) WHERE publish_time IS NULL;

-- Decisions to record in the run's history (LedgerService.RecordApprovalDecision).
CREATE TABLE ledger_outbox (
    id                 bigserial PRIMARY KEY,
    decision_id        uuid NOT NULL UNIQUE,
    request            bytea NOT NULL,          -- RecordApprovalDecisionRequest
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_error         text NOT NULL DEFAULT '',
    done_time          timestamptz,
    given_up           boolean NOT NULL DEFAULT false
);
CREATE INDEX ledger_outbox_due ON ledger_outbox (next_attempt_time)
    WHERE done_time IS NULL AND NOT given_up;

CREATE TABLE subscriptions (
    subscription_id   text PRIMARY KEY,
    url               text NOT NULL,
    secret_ref        text NOT NULL,
    workflow_names    text[] NOT NULL DEFAULT '{}',
    labels            jsonb NOT NULL DEFAULT '{}',
    event_types       smallint[] NOT NULL DEFAULT '{}',
    description       text NOT NULL DEFAULT '',
    created_by_id     text NOT NULL,
    created_by_roles  text[] NOT NULL DEFAULT '{}',
    create_time       timestamptz NOT NULL,
    delete_time       timestamptz
);
CREATE INDEX subscriptions_by_create_time ON subscriptions (create_time, subscription_id)
    WHERE delete_time IS NULL;

CREATE TABLE deliveries (
    delivery_id        uuid PRIMARY KEY,
    subscription_id    text NOT NULL REFERENCES subscriptions (subscription_id),
    approval_id        text NOT NULL REFERENCES approvals (approval_id),
    event_type         smallint NOT NULL,
    body               text NOT NULL,           -- the JSON POSTed, fixed at creation
    state              smallint NOT NULL,
    attempts           integer NOT NULL DEFAULT 0,
    last_status_code   integer NOT NULL DEFAULT 0,
    last_error         text NOT NULL DEFAULT '',
    create_time        timestamptz NOT NULL,
    last_attempt_time  timestamptz,
    next_attempt_time  timestamptz
);
CREATE INDEX deliveries_by_create_time ON deliveries (create_time DESC, delivery_id DESC);
CREATE INDEX deliveries_due ON deliveries (next_attempt_time) WHERE state = 1;

CREATE TABLE delivery_attempts (
    delivery_id     uuid NOT NULL REFERENCES deliveries (delivery_id) ON DELETE CASCADE,
    attempt_number  integer NOT NULL,
    attempt_time    timestamptz NOT NULL,
    status_code     integer NOT NULL DEFAULT 0,   -- 0: no response
    error           text NOT NULL DEFAULT '',
    duration_ms     double precision NOT NULL,
    PRIMARY KEY (delivery_id, attempt_number)
);
