"""embedshim: one containerd shim daemon per containerd instance."""
