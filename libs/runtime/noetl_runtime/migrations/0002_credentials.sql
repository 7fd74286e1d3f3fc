-- 0002: credentials (the CredentialPort of noetl_runtime.postgres_store), next to the catalog of 0001.
--
-- Runs with search_path set to the target schema (postgres_schema.migrate). `secret` holds only the Fernet
-- token of the credential's JSON data (key: NOETL_SECRET_KEY, shared by ingest and the workers); the clear
-- data is never stored, so the database alone never reveals a secret (architecture invariant 7).
CREATE TABLE credential (
    name        text PRIMARY KEY,
    type        text NOT NULL,                        -- postgres | bearer | basic | api_key | header | generic ...
    description text,
    secret      bytea NOT NULL,                       -- Fernet token of the JSON data
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
