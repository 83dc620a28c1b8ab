"""``python -m lightning_pinn``: the ``lightning-pinn`` command."""

import sys

from lightning_pinn.cli import main

if __name__ == "__main__":
    sys.exit(main())
