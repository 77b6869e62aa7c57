-- Files kept with the record of a task's or chunk's attempt (e.g. screenshots
-- of the device a step drove), written by PutArtifact under the attempt's
-- claim and read back by GetArtifact. Descriptions are listed with the tasks
-- and chunks of GetRun; content only leaves through GetArtifact.
CREATE TABLE artifacts (
    artifact_id     text PRIMARY KEY,        -- <owner_id>:<attempt_number>:<name>
    owner_id        text NOT NULL,           -- the task id, or the chunk id
    run_id          text NOT NULL REFERENCES runs (run_id),
    task_id         text NOT NULL REFERENCES tasks (task_id),
    chunk_id        text REFERENCES chunks (chunk_id),
    attempt_number  integer NOT NULL,
    name            text NOT NULL,
    content_type    text NOT NULL,
    size_bytes      bigint NOT NULL,
    sha256          text NOT NULL,           -- hex, computed by the ledger
    content         bytea NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (owner_id, attempt_number, name),
    FOREIGN KEY (owner_id, attempt_number) REFERENCES attempts (owner_id, attempt_number),
    CHECK (size_bytes = octet_length(content))
);
CREATE INDEX artifacts_by_run ON artifacts (run_id, create_time);
-- Content is mostly already compressed (PNG): store it out of line as is.
ALTER TABLE artifacts ALTER COLUMN content SET STORAGE EXTERNAL;
