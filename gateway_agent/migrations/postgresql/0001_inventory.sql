-- The certificate inventory (gateway_agent/inventory.py documents the model).
-- Same tables and columns as the embedded SQLite schema; timestamps are timestamptz,
-- so the daily scan is the design's own query: current_not_after < now + interval '90 days'.

CREATE TABLE devices (
    device_id              VARCHAR(128) PRIMARY KEY,
    current_serial         VARCHAR(64)  NOT NULL,
    current_pin            VARCHAR(71)  NOT NULL,
    current_not_before     TIMESTAMPTZ  NOT NULL,
    current_not_after      TIMESTAMPTZ  NOT NULL,
    current_state          VARCHAR(16)  NOT NULL,
    candidate_serial       VARCHAR(64),
    candidate_pin          VARCHAR(71),
    candidate_not_before   TIMESTAMPTZ,
    candidate_not_after    TIMESTAMPTZ,
    candidate_state        VARCHAR(16),
    retiring_serial        VARCHAR(64),
    retiring_pin           VARCHAR(71),
    retiring_not_before    TIMESTAMPTZ,
    retiring_not_after     TIMESTAMPTZ,
    retiring_state         VARCHAR(16),
    renewal_state          VARCHAR(24)  NOT NULL,
    renewal_since          TIMESTAMPTZ,
    attempts               INTEGER      NOT NULL DEFAULT 0,
    next_attempt_at        TIMESTAMPTZ,
    overlap_until          TIMESTAMPTZ,
    last_error             VARCHAR(512),
    version                INTEGER      NOT NULL,
    CHECK (attempts >= 0),
    CHECK (version >= 1)
);
-- The daily scan: WHERE current_not_after < $now + interval ORDER BY current_not_after.
CREATE INDEX devices_by_expiry ON devices (current_not_after);
CREATE INDEX devices_by_overlap_end ON devices (overlap_until) WHERE overlap_until IS NOT NULL;
CREATE INDEX devices_by_renewal_state ON devices (renewal_state);

CREATE TABLE certificates (
    serial         VARCHAR(64)  PRIMARY KEY,
    device_id      VARCHAR(128) NOT NULL REFERENCES devices (device_id),
    pin            VARCHAR(71)  NOT NULL,
    not_before     TIMESTAMPTZ  NOT NULL,
    not_after      TIMESTAMPTZ  NOT NULL,
    state          VARCHAR(16)  NOT NULL,
    updated_at     TIMESTAMPTZ  NOT NULL,
    revoked_at     TIMESTAMPTZ,
    revoke_reason  VARCHAR(512)
);
CREATE INDEX certificates_by_device ON certificates (device_id);
CREATE INDEX certificates_by_state ON certificates (state);

CREATE TABLE transitions (
    device_id   VARCHAR(128) NOT NULL REFERENCES devices (device_id),
    version     INTEGER      NOT NULL,
    seq         INTEGER      NOT NULL,
    subject     VARCHAR(16)  NOT NULL,
    serial      VARCHAR(64),
    from_state  VARCHAR(24),
    to_state    VARCHAR(24)  NOT NULL,
    at          TIMESTAMPTZ  NOT NULL,
    cause       VARCHAR(512) NOT NULL,
    PRIMARY KEY (device_id, version, seq)
);
