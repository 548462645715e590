"""The daemon's persistent state (sqlite), read back after a crash or a reload."""
