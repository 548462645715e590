"""Task events to containerd, in order, never blocking a request."""
