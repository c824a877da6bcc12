"""The web side: the console and JSON API of `svc run web` (ADR 0040, 0041), and
outgoing webhooks (hooks*.py, ADR 0042)."""
