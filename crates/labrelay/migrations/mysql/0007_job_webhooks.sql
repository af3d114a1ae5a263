-- job-worker: a webhook POSTed when a job ends. `webhook` names a [jobs.webhooks.NAME]
-- entry; `webhook_next_ms` is both the hold of the worker sending it and the time of
-- the next try after a failure; `webhook_done_ms` says it was delivered or given up
-- (`webhook_error` then says why); `webhook_attempts` counts the tries.
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS webhook VARCHAR(64);
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS webhook_next_ms BIGINT;
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS webhook_done_ms BIGINT;
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS webhook_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS webhook_error TEXT;
