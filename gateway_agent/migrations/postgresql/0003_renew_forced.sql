-- An operator's renewal ("certs renew") that failed is retried with backoff until it succeeds:
-- the flag survives restarts and moves with the device row (SQLite schema version 2).

ALTER TABLE devices ADD COLUMN renew_forced INTEGER NOT NULL DEFAULT 0;
-- The retry loop asks often; only the few flagged devices are indexed.
CREATE INDEX devices_forced_pending ON devices (next_attempt_at) WHERE renew_forced = 1;
