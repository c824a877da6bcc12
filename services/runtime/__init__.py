"""Runtime building blocks shared by every role."""
