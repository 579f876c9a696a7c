"""`python -m minifn` is the `minifn` command."""

from minifn.cli import main

main()
