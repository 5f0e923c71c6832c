"""Run the CLI with `python -m jobwire.cli`."""

from jobwire.cli.app import main

main()
