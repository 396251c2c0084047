"""`python -m agentspoonsd` is the `agentspoonsd` command."""

from .cli import main

raise SystemExit(main())
