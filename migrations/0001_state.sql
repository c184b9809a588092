-- lethe's control-plane state, shared by every replica (see src/tenants/store/postgres.rs).
-- Applied once, at start-up, by the first replica that finds it missing.

-- One row: the revision every commit bumps (and replicas compare), and whether a tenant key
-- ever existed (from then on unknown keys are refused).
CREATE TABLE lethe_meta (
    id smallint PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL,
    keyed boolean NOT NULL DEFAULT false
);
INSERT INTO lethe_meta (id, revision, keyed) VALUES (1, 0, false);

CREATE TABLE lethe_tenants (
    name text PRIMARY KEY,
    -- The tenant policy as lethe serializes it (src/tenants/policy.rs).
    policy jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Key hashes (SHA-256), never keys.
CREATE TABLE lethe_api_keys (
    id text PRIMARY KEY,
    tenant text NOT NULL REFERENCES lethe_tenants (name) ON DELETE CASCADE,
    hash text NOT NULL UNIQUE,
    created bigint NOT NULL,
    seq bigserial NOT NULL
);
CREATE INDEX lethe_api_keys_tenant ON lethe_api_keys (tenant, seq);

-- The current generation (content hash) of each adapter name.
CREATE TABLE lethe_adapters (
    name text PRIMARY KEY,
    generation text NOT NULL,
    path text NOT NULL,
    updated_at bigint NOT NULL,
    updated_by text NOT NULL
);

-- Every generation ever made current under a name (rollback targets, audit).
CREATE TABLE lethe_adapter_generations (
    name text NOT NULL,
    generation text NOT NULL,
    path text NOT NULL,
    profile jsonb,
    first_loaded_at bigint NOT NULL,
    loaded_by text NOT NULL,
    last_current_at bigint NOT NULL,
    last_current_revision bigint NOT NULL,
    seq bigserial NOT NULL,
    PRIMARY KEY (name, generation)
);

-- One entry per commit: who, what, before/after, when. Append-only.
CREATE TABLE lethe_audit (
    revision bigint PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    replica text NOT NULL,
    request_id text,
    before jsonb NOT NULL,
    after jsonb NOT NULL
);

CREATE FUNCTION lethe_audit_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lethe_audit is append-only';
END
$$;
CREATE TRIGGER lethe_audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON lethe_audit
    FOR EACH STATEMENT EXECUTE FUNCTION lethe_audit_is_append_only();
