-- job-worker / code-submit: one row per job. `state` is queued -> running -> succeeded
-- | failed | dead | cancelled (a failed attempt with attempts left goes back to queued
-- with a later `run_at_ms`). A claim is a lease: `worker` holds the job until
-- `lease_until_ms`, renewed by heartbeats; every write of a running job names its
-- `attempt`, so a worker whose lease was lost (and the job claimed again) cannot
-- complete it (fencing). `unique_key` is an idempotency key: a second submission with
-- the same key gets the first job. `notify` gets a mail when the job ends: `notified_ms`
-- says it was sent, `notify_lease_ms` which worker holds the sending. Times are
-- milliseconds since the epoch.
CREATE TABLE IF NOT EXISTS labrelay_jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    task             TEXT NOT NULL,
    args             TEXT NOT NULL,
    queue            TEXT NOT NULL,
    priority         BIGINT NOT NULL DEFAULT 0,
    state            TEXT NOT NULL,
    attempt          BIGINT NOT NULL DEFAULT 0,
    max_attempts     BIGINT NOT NULL,
    run_at_ms        BIGINT NOT NULL,
    unique_key       TEXT UNIQUE,
    submitter        TEXT NOT NULL,
    notify           TEXT,
    worker           TEXT,
    lease_until_ms   BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    created_ms       BIGINT NOT NULL,
    started_ms       BIGINT,
    finished_ms      BIGINT,
    exit_code        BIGINT,
    term_signal      BIGINT,
    stdout           TEXT,
    stderr           TEXT,
    result           TEXT,
    error            TEXT,
    duration_ms      BIGINT,
    notified_ms      BIGINT,
    notify_lease_ms  BIGINT
);
-- The claim walks this index: ready jobs of a queue, highest priority first, then
-- the earliest run_at, then submission order.
CREATE INDEX IF NOT EXISTS labrelay_jobs_ready ON labrelay_jobs (state, queue, priority DESC, run_at_ms, id);
CREATE INDEX IF NOT EXISTS labrelay_jobs_submitter ON labrelay_jobs (submitter, created_ms);
