"""bitplan service."""
