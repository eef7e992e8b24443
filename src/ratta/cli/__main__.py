"""``python -m ratta.cli``: the ``ratta`` command."""

import sys

from ratta.cli import main

sys.exit(main())
