import sys

from shim.cmd.cli import main

sys.exit(main())
