"""Operator commands: demo, chat, status."""
