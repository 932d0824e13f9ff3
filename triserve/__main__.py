"""``python -m triserve``: the same as the ``triserve`` command."""

import sys

from triserve.cli import main

sys.exit(main())
