"""`python -m flexvar.cli ...` runs the `flexvar` command."""
import sys

from flexvar.cli import main

sys.exit(main())
