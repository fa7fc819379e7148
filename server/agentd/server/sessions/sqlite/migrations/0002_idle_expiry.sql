-- Version 2: idle expiry.
ALTER TABLE sessions ADD COLUMN ttl_s REAL;
ALTER TABLE sessions ADD COLUMN expires_at REAL;
CREATE INDEX sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
