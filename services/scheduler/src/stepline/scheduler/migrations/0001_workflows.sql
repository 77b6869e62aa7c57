-- The scheduler's workflow definitions. Versions are immutable and numbered
-- 1..N per workflow name; `definition` holds the serialized
-- stepline.api.common.v1.WorkflowDefinition with its name and version set.

CREATE TABLE workflows (
    name            text PRIMARY KEY,
    latest_version  bigint NOT NULL,
    description     text NOT NULL DEFAULT '',
    labels          jsonb NOT NULL DEFAULT '{}',
    create_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX workflows_labels ON workflows USING gin (labels jsonb_path_ops);

CREATE TABLE workflow_versions (
    name            text NOT NULL REFERENCES workflows (name),
    version         bigint NOT NULL,
    definition      bytea NOT NULL,
    digest          text NOT NULL,
    created_by_id   text NOT NULL,
    created_by_roles text[] NOT NULL DEFAULT '{}',
    create_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (name, version)
);

-- Idempotency record of RegisterWorkflow: a replayed request_id with the same
-- digest returns the version it produced; with another digest it is refused.
CREATE TABLE workflow_requests (
    request_id      text PRIMARY KEY,
    name            text NOT NULL,
    version         bigint NOT NULL,
    digest          text NOT NULL,
    created         boolean NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT clock_timestamp()
);
