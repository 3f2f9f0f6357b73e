"""``python -m softjac``: the ``softjac`` command (see :mod:`softjac.cli`)."""

import sys

from softjac.cli import main

if __name__ == "__main__":
    sys.exit(main())
