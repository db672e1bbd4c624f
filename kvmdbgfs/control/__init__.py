"""The control plane: a Unix socket through which the `kvmdbgfs` CLI drives a running mount."""
