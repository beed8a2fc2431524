"""``python -m pneumoscan.cli``: the same as the ``pneumoscan`` command."""

import sys

from . import main

sys.exit(main())
