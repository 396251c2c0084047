"""agentspoonsd: a real-time market-volatility streaming daemon."""

__version__ = "0.1.0"
