"""`python -m services` is `svc`."""

from services.cli import main

main()
