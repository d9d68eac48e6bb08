"""``python -m coordinator.cli``: the ``coordinator`` command."""

import sys

from coordinator.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
