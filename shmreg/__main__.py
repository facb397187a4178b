"""``python -m shmreg``: the same as the ``shmreg`` command."""

import sys

from shmreg._cli import main

sys.exit(main())
