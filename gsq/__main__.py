"""`python -m gsq ...` (and `torchrun -m gsq ...`): the `gsq` command line."""

import sys

from .cli import main

sys.exit(main())
