"""The channel layer: account ownership, egress and ingress, for any transport."""
