"""bitplan db."""
