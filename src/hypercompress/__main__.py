"""`python -m hypercompress ...`: the command line (what launchers such as torchrun start)."""

from .cli import main

main()
