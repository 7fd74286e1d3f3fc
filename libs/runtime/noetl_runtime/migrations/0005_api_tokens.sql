-- 0003: API tokens (noetl_runtime.tokens.PostgresTokens) and who registered each playbook version.
--
-- Runs with search_path set to the target schema (postgres_schema.migrate). A token is stored only as the
-- SHA-256 of its text: the database alone never yields a usable token (docs/security.md "Tokens").
CREATE TABLE api_token (
    token_hash  text PRIMARY KEY,                     -- sha256 hex of the token; the token is never stored
    name        text NOT NULL UNIQUE,
    role        text NOT NULL,                        -- viewer | operator | author | admin | worker
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,                          -- NULL: never
    revoked_at  timestamptz,
    created_by  text
);

-- The principal that registered a version (shown by the catalog routes of the query API).
ALTER TABLE catalog ADD COLUMN registered_by text;
