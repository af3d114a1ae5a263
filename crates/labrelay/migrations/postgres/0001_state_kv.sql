-- labrelay's own key/value state (e.g. the last IMAP UID a watcher processed).
CREATE TABLE IF NOT EXISTS labrelay_kv (
    scope      TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (scope, name)
);
