"""bitplan workers."""
