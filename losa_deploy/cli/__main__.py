"""`python -m losa_deploy.cli`."""

from . import main

main()
