"""``python -m streampress.eval``: the ``streampress eval`` command on its own (also under torchrun)."""

import sys

from streampress.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
