"""`python -m dinox`: the `dinox` command, for an environment whose scripts are not on PATH."""
import sys

from dinox.cli import main

sys.exit(main())
