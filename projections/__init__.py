"""Read models: pure apply(event) logic and SQL schemas; imports contracts only."""
