"""``python -m sketchsweep.workers``: several sweep workers on one study (``sketchsweep.sweep.workers``)."""

import sys

from sketchsweep.sweep.workers import main

if __name__ == "__main__":
    sys.exit(main())
