"""``python -m canonreg`` — see :mod:`canonreg.cli`."""

import sys

from .cli import main

sys.exit(main())
