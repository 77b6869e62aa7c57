-- A task transition answers with the run's pending control action (PAUSE
-- requested while the step ran), so the holder applies it at that step
-- boundary without waiting for the control event: the batch's read of its runs
-- (run_claims) carries it too.
CREATE OR REPLACE VIEW run_claims AS
    SELECT run_id, state, claim_executor, claim_epoch, claim_expire, last_sequence, update_time,
           pending_control
    FROM runs;
