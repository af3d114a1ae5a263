-- code-submit: one row per submission (the seed's `uploads` table and its results).
-- The source is in the storage backend as `source_key` (`ID.EXT`); `status` is
-- Not Run, then the Judge0 names (In Queue, Processing, Accepted, ...). `job_id` is the
-- job of the latest run, `runs` how many runs finished: a run's job has the unique key
-- `code:ID:RUNS`, so a `run` repeated after a crash finds the same job, and a result
-- is stored only by the job that the row names (fencing). `disabled` is set when a run
-- ends in an error of the code; `code-submit enable` clears it.
CREATE TABLE IF NOT EXISTS labrelay_code_submissions (
    id             TEXT NOT NULL PRIMARY KEY,
    email          TEXT NOT NULL,
    language       VARCHAR(32) NOT NULL,
    source_key     TEXT NOT NULL,
    stdin          TEXT,
    expected       TEXT,
    submitter      TEXT NOT NULL,
    disabled       BIGINT NOT NULL DEFAULT 0,
    status         VARCHAR(32) NOT NULL,
    job_id         BIGINT,
    runs           BIGINT NOT NULL DEFAULT 0,
    exit_code      BIGINT,
    term_signal    BIGINT,
    time_ms        BIGINT,
    wall_ms        BIGINT,
    memory_kib     BIGINT,
    stdout         TEXT,
    stderr         TEXT,
    compile_output TEXT,
    message        TEXT,
    limits_by      VARCHAR(32),
    created_ms     BIGINT NOT NULL,
    queued_ms      BIGINT,
    finished_ms    BIGINT
);
CREATE INDEX IF NOT EXISTS labrelay_code_submissions_email ON labrelay_code_submissions (email, created_ms);
