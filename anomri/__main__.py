"""``python -m anomri`` runs the command line."""

import sys

from anomri.cli import main

sys.exit(main())
