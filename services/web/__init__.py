"""The web side: the operator console and HTTP API, and outgoing webhooks (hooks*.py)."""
