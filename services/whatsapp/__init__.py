"""WhatsApp channel: ingress, egress, account ownership and transports (sim, neonize)."""
