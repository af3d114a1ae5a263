-- Deliveries: the target's identity (a hash of its URL, endpoint, bucket and prefix), so
-- a journal is only trusted for the target it was written for, and one row per
-- once-only step of a delivery (LIMS status writes, customer access and mail) with its
-- intent and outcome, so a re-run after a crash does not repeat a finished step.
ALTER TABLE delivery_runs ADD COLUMN IF NOT EXISTS target_id TEXT;

CREATE TABLE IF NOT EXISTS delivery_steps (
    run_id       TEXT NOT NULL,
    step         TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    done_at      TEXT,
    detail       TEXT,
    PRIMARY KEY (run_id, step)
);
