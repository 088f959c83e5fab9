"""``python -m canonreg.ablate CONFIG …`` (same as ``canonreg ablate``)."""

import sys

from .cli import main

sys.exit(main())
