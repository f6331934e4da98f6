"""`python -m memsock ARGS`: the `memsock` command line (see memsock._cli)."""

from ._cli import main

main()
