"""``python -m dsmoe``: the same command line as the ``dsmoe`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
