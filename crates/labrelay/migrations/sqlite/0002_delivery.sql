-- Deliveries (delivery-upload, upload-pure): one row per delivery, the resume journal of
-- finished files and of multipart uploads in progress.
-- Object keys can be 1024 bytes, longer than an index allows on MariaDB, so the journal
-- is keyed by the SHA-256 of the key (key_hash) and keeps the key itself in file_key.
CREATE TABLE IF NOT EXISTS delivery_runs (
    id           TEXT NOT NULL PRIMARY KEY,
    tool         TEXT NOT NULL,
    analysis_id  TEXT NOT NULL,
    project_id   TEXT,
    target       TEXT NOT NULL,
    key_prefix   TEXT NOT NULL,
    source_path  TEXT,
    status       TEXT NOT NULL,
    files        INTEGER NOT NULL DEFAULT 0,
    bytes        INTEGER NOT NULL DEFAULT 0,
    failed_files INTEGER NOT NULL DEFAULT 0,
    account      TEXT,
    access_kind  TEXT,
    expires_at   TEXT,
    notified_at  TEXT,
    md5sum_key   TEXT,
    error        TEXT,
    request_id   TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    finished_at  TEXT
);
CREATE INDEX IF NOT EXISTS delivery_runs_analysis ON delivery_runs (analysis_id, target);

CREATE TABLE IF NOT EXISTS delivery_files (
    run_id       TEXT NOT NULL,
    key_hash     TEXT NOT NULL,
    file_key     TEXT NOT NULL,
    size         INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    md5          TEXT NOT NULL,
    sha256       TEXT,
    etag         TEXT,
    parts        INTEGER NOT NULL DEFAULT 0,
    finished_at  TEXT NOT NULL,
    PRIMARY KEY (run_id, key_hash)
);

CREATE TABLE IF NOT EXISTS delivery_multipart (
    run_id       TEXT NOT NULL,
    key_hash     TEXT NOT NULL,
    file_key     TEXT NOT NULL,
    upload_id    TEXT NOT NULL,
    part_size    INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (run_id, key_hash)
);

CREATE TABLE IF NOT EXISTS delivery_parts (
    run_id       TEXT NOT NULL,
    key_hash     TEXT NOT NULL,
    part_index   INTEGER NOT NULL,
    etag         TEXT NOT NULL,
    md5          TEXT NOT NULL,
    PRIMARY KEY (run_id, key_hash, part_index)
);
