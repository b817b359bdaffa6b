"""`python -m fastes ...` is the `fastes` command."""

import sys

from fastes.cli import main

sys.exit(main())
