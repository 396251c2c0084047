"""The redis broker: several nodes, one generator elected with a Redis lease, one stream per symbol.

- `entries`: stream keys, entry ids and payloads, seq continuation (pure);
- `election`: the lease state machine (pure: it is told the time and the replies);
- `service`: the Trio service that drives both against Redis through coredis.
"""
