"""`python -m lightspan` runs the command line."""

import sys

from lightspan.cli import main

sys.exit(main())
