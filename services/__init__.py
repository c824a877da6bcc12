"""Services: every piece of I/O (NATS, SQLite, WhatsApp, CLI, telemetry)."""
