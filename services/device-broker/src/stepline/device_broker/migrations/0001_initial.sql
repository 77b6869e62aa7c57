-- The device broker's schema: the inventory, the lease history (with the
-- fencing token counter on each device), quarantine evidence, account
-- bindings, and the idempotency record of operator requests.
-- States are the numbers of stepline.api.common.v1.DeviceState.

CREATE TABLE devices (
    serial             text PRIMARY KEY,
    adb_server         text NOT NULL,
    model              text NOT NULL DEFAULT '',
    product            text NOT NULL DEFAULT '',
    pool               text NOT NULL,
    labels             jsonb NOT NULL DEFAULT '{}',
    cleanup_profile    text NOT NULL,
    state              smallint NOT NULL,
    -- grows with every change of state, binding or reachability, so that the
    -- broker's in-memory view applies changes in commit order
    version            bigint NOT NULL DEFAULT 1,
    online             boolean NOT NULL DEFAULT true,
    -- account the device is bound to ('' if none); leases for it go to this device only
    bound_account      text NOT NULL DEFAULT '',
    -- fencing token counter: the token of the device's latest lease; never goes down
    last_token         bigint NOT NULL DEFAULT 0,
    -- the live lease, in LEASED state only
    lease_id           text,
    -- why the device is CLEANING: `intake`, `reconnect`, `released`, `expired`,
    -- `device_fault` or `operator`, and the lease whose end started it
    cleaning_reason    text NOT NULL DEFAULT '',
    cleaning_lease_id  text,
    -- package list of the clean device; cleanup compares against it
    baseline_packages  text[],
    health             jsonb,
    health_time        timestamptz,
    quarantine_id      bigint,
    last_seen_time     timestamptz,
    create_time        timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time        timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- one account is never bound to two devices
CREATE UNIQUE INDEX devices_one_device_per_account ON devices (bound_account)
    WHERE bound_account <> '';

CREATE TABLE leases (
    lease_id            text PRIMARY KEY,
    request_id          text NOT NULL UNIQUE,
    fingerprint         text NOT NULL,
    serial              text NOT NULL REFERENCES devices (serial),
    token               bigint NOT NULL,
    executor_id         text NOT NULL,
    run_id              text NOT NULL DEFAULT '',
    task_id             text NOT NULL DEFAULT '',
    chunk_id            text NOT NULL DEFAULT '',
    account             text NOT NULL DEFAULT '',
    grant_time          timestamptz NOT NULL,
    expire_time         timestamptz NOT NULL,
    end_time            timestamptz,
    -- `released`, `expired` or `revoked`
    end_reason          text,
    outcome             smallint NOT NULL DEFAULT 0,
    message             text NOT NULL DEFAULT '',
    release_request_id  text,
    cleanup_start_time  timestamptz,
    cleanup_end_time    timestamptz,
    -- `clean`, `quarantined` or `skipped`
    cleanup_result      text,
    UNIQUE (serial, token)
);
-- at most one live lease per device, whatever the code above does
CREATE UNIQUE INDEX leases_one_live_per_device ON leases (serial) WHERE end_time IS NULL;
CREATE INDEX leases_live_by_expiry ON leases (expire_time) WHERE end_time IS NULL;
CREATE INDEX leases_by_device ON leases (serial, grant_time DESC);

CREATE TABLE quarantines (
    quarantine_id    bigserial PRIMARY KEY,
    serial           text NOT NULL REFERENCES devices (serial),
    reason           text NOT NULL,
    evidence         jsonb NOT NULL DEFAULT '{}',
    actor_id         text NOT NULL,
    actor_roles      text[] NOT NULL DEFAULT '{}',
    quarantine_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    release_time     timestamptz,
    released_by      text,
    release_reason   text
);
CREATE INDEX quarantines_by_device ON quarantines (serial, quarantine_time DESC);

-- history of account bindings (the current one is devices.bound_account)
CREATE TABLE bindings (
    binding_id   bigserial PRIMARY KEY,
    serial       text NOT NULL REFERENCES devices (serial),
    account      text NOT NULL,
    bound_by     text NOT NULL,
    bind_time    timestamptz NOT NULL DEFAULT clock_timestamp(),
    unbound_by   text,
    unbind_time  timestamptz
);
CREATE UNIQUE INDEX bindings_current ON bindings (serial) WHERE unbind_time IS NULL;

CREATE TABLE requests (
    method       text NOT NULL,
    request_id   text NOT NULL,
    fingerprint  text NOT NULL,
    response     bytea NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (method, request_id)
);
