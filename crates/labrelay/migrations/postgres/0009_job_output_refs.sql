-- job-worker with [jobs] output_storage: an attempt whose stdout or stderr was longer
-- than output_cap_bytes keeps the first output_cap_bytes in the row and the whole
-- stream in the storage backend, under the key kept here.
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS stdout_ref TEXT;
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS stderr_ref TEXT;
