"""The containerd Task service, its tasks and their processes, the lifecycle table."""
