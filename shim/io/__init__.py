"""Process stdio: containerd's stdio URIs, FIFOs, logging programs, terminals."""
