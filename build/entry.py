"""The frozen executable's entry point: exactly the `agentspoonsd` console script."""

from agentspoonsd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
