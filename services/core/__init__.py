"""The agent core: consumes INBOUND, runs turns, records them on AGENT, queues OUTBOUND jobs."""
