-- Deliveries: the target's identity (a hash of its URL, endpoint, bucket and prefix), so
-- a journal is only trusted for the target it was written for, and one row per
-- once-only step of a delivery (LIMS status writes, customer access and mail) with its
-- intent and outcome, so a re-run after a crash does not repeat a finished step.
ALTER TABLE delivery_runs ADD COLUMN IF NOT EXISTS target_id CHAR(64);

CREATE TABLE IF NOT EXISTS delivery_steps (
    run_id       VARCHAR(64) NOT NULL,
    step         VARCHAR(64) NOT NULL,
    started_at   VARCHAR(40) NOT NULL,
    done_at      VARCHAR(40),
    detail       LONGTEXT,
    PRIMARY KEY (run_id, step)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
