"""kvmdbgfs: an emulated KVM host whose debugfs tree is served over FUSE."""
