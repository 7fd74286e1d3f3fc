"""The ingest service: the write API (catalog registration, execution requests, cancel, posted facts,
credentials). Validates, resolves playbooks and hands inbound messages to the fold through `submit`."""
