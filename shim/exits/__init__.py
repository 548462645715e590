"""Exit watching: the reaper, pidfds, the pinned BPF exit tracker, OOM kills."""
