-- Deliveries (delivery-upload, upload-pure): one row per delivery, the resume journal of
-- finished files and of multipart uploads in progress.
-- Object keys can be 1024 bytes, longer than an index allows on MariaDB, so the journal
-- is keyed by the SHA-256 of the key (key_hash) and keeps the key itself in file_key.
CREATE TABLE IF NOT EXISTS delivery_runs (
    id           VARCHAR(64) NOT NULL PRIMARY KEY,
    tool         VARCHAR(32) NOT NULL,
    analysis_id  VARCHAR(191) NOT NULL,
    project_id   VARCHAR(191),
    target       VARCHAR(191) NOT NULL,
    key_prefix   LONGTEXT NOT NULL,
    source_path  LONGTEXT,
    status       VARCHAR(32) NOT NULL,
    files        BIGINT NOT NULL DEFAULT 0,
    bytes        BIGINT NOT NULL DEFAULT 0,
    failed_files BIGINT NOT NULL DEFAULT 0,
    account      LONGTEXT,
    access_kind  VARCHAR(32),
    expires_at   VARCHAR(40),
    notified_at  VARCHAR(40),
    md5sum_key   LONGTEXT,
    error        LONGTEXT,
    request_id   VARCHAR(191),
    created_at   VARCHAR(40) NOT NULL,
    updated_at   VARCHAR(40) NOT NULL,
    finished_at  VARCHAR(40),
    INDEX delivery_runs_analysis (analysis_id, target)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS delivery_files (
    run_id       VARCHAR(64) NOT NULL,
    key_hash     CHAR(64) NOT NULL,
    file_key     LONGTEXT NOT NULL,
    size         BIGINT NOT NULL,
    mtime_ns     BIGINT NOT NULL,
    md5          VARCHAR(191) NOT NULL,
    sha256       VARCHAR(191),
    etag         VARCHAR(191),
    parts        BIGINT NOT NULL DEFAULT 0,
    finished_at  VARCHAR(40) NOT NULL,
    PRIMARY KEY (run_id, key_hash)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS delivery_multipart (
    run_id       VARCHAR(64) NOT NULL,
    key_hash     CHAR(64) NOT NULL,
    file_key     LONGTEXT NOT NULL,
    upload_id    LONGTEXT NOT NULL,
    part_size    BIGINT NOT NULL,
    size         BIGINT NOT NULL,
    mtime_ns     BIGINT NOT NULL,
    created_at   VARCHAR(40) NOT NULL,
    PRIMARY KEY (run_id, key_hash)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS delivery_parts (
    run_id       VARCHAR(64) NOT NULL,
    key_hash     CHAR(64) NOT NULL,
    part_index   BIGINT NOT NULL,
    etag         VARCHAR(191) NOT NULL,
    md5          VARCHAR(191) NOT NULL,
    PRIMARY KEY (run_id, key_hash, part_index)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
