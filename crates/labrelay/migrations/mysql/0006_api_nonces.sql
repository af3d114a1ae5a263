-- job-worker serve: the nonce of every signed request seen within the clock window, so
-- a replayed request is refused by every serve process sharing the state database.
-- Rows whose expires_ms has passed are deleted as requests come in.
CREATE TABLE IF NOT EXISTS labrelay_api_nonces (
    user_name  VARCHAR(128) NOT NULL,
    nonce      VARCHAR(64) NOT NULL,
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (user_name, nonce)
);
CREATE INDEX IF NOT EXISTS labrelay_api_nonces_expires ON labrelay_api_nonces (expires_ms);
