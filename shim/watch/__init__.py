"""Every process in our containers, from the kernel: the BPF probe, its ring, the stream."""
