"""x86 MMU model: rmap lists, memslots, shadow pages."""
