-- Cron schedules. `spec` holds the serialized stepline.api.scheduler.v1.Schedule
-- as given at creation (workflow, version, cron expression, time zone, inputs,
-- labels, overlap policy, description); the columns hold what changes.
CREATE TABLE schedules (
    schedule_id       text PRIMARY KEY,
    request_id        text UNIQUE,
    fingerprint       text NOT NULL,
    workflow_name     text NOT NULL,
    spec              bytea NOT NULL,
    state             smallint NOT NULL,          -- ScheduleState: 1 active, 2 paused
    created_by_id     text NOT NULL,
    created_by_roles  text[] NOT NULL DEFAULT '{}',
    create_time       timestamptz NOT NULL,
    update_time       timestamptz NOT NULL,
    next_fire_time    timestamptz,                -- NULL while paused
    last_fire_time    timestamptz,
    last_run_id       text NOT NULL DEFAULT '',   -- run of the last firing; '' if skipped
    latest_run_id     text NOT NULL DEFAULT ''    -- last run started, for the overlap policy
);
CREATE INDEX schedules_due ON schedules (next_fire_time) WHERE state = 1;
CREATE INDEX schedules_workflow ON schedules (workflow_name, create_time);

-- One row per firing, inserted in the transaction that advances the schedule's
-- next_fire_time (compare-and-set on the old value), so each due time is claimed
-- by one scheduler replica only. `done` is set once the run was started (or the
-- firing skipped or refused); a firing left undone by a crash is retried with the
-- same StartRun idempotency key after its claim lapsed.
CREATE TABLE schedule_fires (
    schedule_id   text NOT NULL REFERENCES schedules (schedule_id) ON DELETE CASCADE,
    fire_time     timestamptz NOT NULL,
    claim_time    timestamptz NOT NULL,
    done          boolean NOT NULL DEFAULT false,
    run_id        text NOT NULL DEFAULT '',
    outcome       text NOT NULL DEFAULT '',
    PRIMARY KEY (schedule_id, fire_time)
);
CREATE INDEX schedule_fires_open ON schedule_fires (claim_time) WHERE NOT done;
