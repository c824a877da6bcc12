"""Switchboard contracts: events, commands, subjects, stream specs and the codec. No I/O."""
