"""Model sources (filled in by the zoo work)."""
