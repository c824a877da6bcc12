"""Plugins: the registry (entry points), the projection the core reads, built-ins."""
