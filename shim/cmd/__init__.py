"""Entry points: the subcommands (start, delete, check, reload, -info) and the daemon."""
