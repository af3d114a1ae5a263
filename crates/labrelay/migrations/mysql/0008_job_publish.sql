-- job-worker with [jobs] broker = "rabbitmq": when a job was last published to its
-- RabbitMQ queue (0: not since it was submitted, claimed or given back). Workers publish
-- what is ready and unpublished (a transactional outbox: the row is the truth, the
-- message only says "look at job N"), and publish again what stayed unclaimed too long.
ALTER TABLE labrelay_jobs ADD COLUMN IF NOT EXISTS published_ms BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS labrelay_jobs_publish ON labrelay_jobs (state, published_ms);
