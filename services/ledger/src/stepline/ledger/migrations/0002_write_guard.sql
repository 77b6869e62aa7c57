-- Optimistic guard for writes applied as a unit of work (stepline.ledger.unit):
-- the unit reads its rows without locking them and writes them back in one
-- statement only where each run's last_sequence is still what it read. A
-- concurrent writer (another ledger replica) makes the counts differ, and
-- this aborts the whole statement with serialization_failure.
CREATE FUNCTION ledger_expect_rows(matched bigint, expected bigint, what text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF matched <> expected THEN
        RAISE EXCEPTION 'concurrent write to %: % of % rows unchanged since read',
            what, matched, expected
            USING ERRCODE = 'serialization_failure';
    END IF;
END
$$;
