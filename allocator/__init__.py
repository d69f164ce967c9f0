"""bitplan allocator."""
