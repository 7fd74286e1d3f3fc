"""The ingest service: the write API (catalog registration, execution requests, cancel, posted facts,
credentials). Validates, resolves playbooks and hands inbound messages to the fold through `submit`.

It has no process of its own: its router is served by the HTTP API `noetl_frontend` composes (the ingest
role of a cluster runs `python -m noetl_frontend`)."""
