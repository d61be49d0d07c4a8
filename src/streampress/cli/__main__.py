"""``python -m streampress.cli``: the ``streampress`` command."""

import sys

from .app import main

sys.exit(main())
