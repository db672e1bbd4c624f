"""The emulated guest OS: RAM layout, page tables, processes."""
