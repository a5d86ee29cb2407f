"""`python -m losa_deploy`."""

from .cli import main

main()
