"""`python -m service.cli`: the `bitplan` command with warnings logged (how benches and the
worker tests start servers and workers)."""

from service.cli import main

main()
