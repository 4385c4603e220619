-- Agent HA: one leader per inventory (a lease with expiry and a fencing token) and one
-- renewal claim per device. Expiry uses the database clock (clock_timestamp()), so the
-- agents' clocks never decide who leads.

CREATE TABLE leader_lease (
    name        VARCHAR(64)  PRIMARY KEY,
    holder      VARCHAR(200) NOT NULL,
    token       BIGINT       NOT NULL CHECK (token >= 1),
    acquired_at TIMESTAMPTZ  NOT NULL,
    expires_at  TIMESTAMPTZ  NOT NULL
);

CREATE TABLE renewal_claims (
    device_id   VARCHAR(128) PRIMARY KEY REFERENCES devices (device_id),
    holder      VARCHAR(200) NOT NULL,
    token       BIGINT       NOT NULL,
    claimed_at  TIMESTAMPTZ  NOT NULL,
    expires_at  TIMESTAMPTZ  NOT NULL
);
CREATE INDEX renewal_claims_by_holder ON renewal_claims (holder);
