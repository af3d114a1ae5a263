-- labrelay's own key/value state (e.g. the last IMAP UID a watcher processed).
CREATE TABLE IF NOT EXISTS labrelay_kv (
    scope      VARCHAR(191) NOT NULL,
    name       VARCHAR(191) NOT NULL,
    value      LONGTEXT NOT NULL,
    updated_at VARCHAR(40) NOT NULL,
    PRIMARY KEY (scope, name)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
