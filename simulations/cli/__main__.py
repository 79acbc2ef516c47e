"""`python -m simulations.cli ...`, the same as `fedtiny ...`."""

import sys

from simulations.cli import main

sys.exit(main())
