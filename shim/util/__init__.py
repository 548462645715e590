"""What every layer uses: errors, logging, paths, identifiers, /proc facts, wire."""
