"""agentspoonsd: a real-time market-volatility streaming daemon."""

__version__ = "0.2.0"
