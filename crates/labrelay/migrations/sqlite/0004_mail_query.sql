-- mail-query: one row per request mail, written before anything else is done with it
-- (intake is durable first). `id` is the SHA-256 of the Message-ID (of the raw message
-- when it has none), so a message seen again is never answered twice. `stage` says how
-- far the answer went: received -> built (reply mails on disk) -> replied (accepted by
-- SMTP or written to the outbox) -> filed (moved to processed/rejected folder).
-- `source` is `imap:FOLDER` (with the message's UID in `imap_uid`) or `eml`.
CREATE TABLE IF NOT EXISTS mail_query_requests (
    id               TEXT NOT NULL PRIMARY KEY,
    message_id       TEXT,
    source           TEXT NOT NULL,
    imap_uid         BIGINT,
    raw_path         TEXT NOT NULL,
    sender           TEXT,
    database_name    TEXT,
    stage            TEXT NOT NULL,
    verdict          TEXT,
    reason           TEXT,
    statements       BIGINT NOT NULL DEFAULT 0,
    rows_total       BIGINT NOT NULL DEFAULT 0,
    files            BIGINT NOT NULL DEFAULT 0,
    mails            BIGINT NOT NULL DEFAULT 0,
    mails_sent       BIGINT NOT NULL DEFAULT 0,
    reply_message_id TEXT,
    received_at      TEXT NOT NULL,
    replied_at       TEXT,
    filed_at         TEXT,
    updated_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mail_query_requests_received ON mail_query_requests (received_at);
