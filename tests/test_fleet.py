"""The workers' bookkeeping (pure): their number, their share of the limits, their counters."""

from __future__ import annotations

from agentspoonsd.auth import TokenSpec, TokenStore
from agentspoonsd.fleet import (
    Placement,
    StatsBook,
    WorkerConfig,
    report_fields,
    share,
    worker_config,
    worker_count,
)
from agentspoonsd.metrics import Stats
from agentspoonsd.reloading import limits_from
from agentspoonsd.settings import Settings

DIGEST = "ab" * 32


def test_auto_is_one_worker_per_core_and_a_number_is_itself() -> None:
    assert worker_count("auto", cpus=8) == 8
    assert worker_count("auto", cpus=0) == 1
    assert worker_count("auto") >= 1
    assert worker_count(3, cpus=8) == 3


def test_a_limit_is_split_evenly_rounded_up() -> None:
    assert share(20000, 2) == 10000
    assert share(1001, 4) == 251  # 4 × 251 = 1004: over by less than the number of workers
    assert share(1, 8) == 1  # never 0: each worker may serve someone
    assert share(None, 4) is None


def test_each_worker_gets_its_share_of_every_connection_limit_and_the_rest_whole() -> None:
    settings = Settings(server={"max_connections": 1000, "max_connections_per_ip": 10})
    limits = limits_from(settings)
    tokens = [
        TokenSpec("capped", DIGEST, ("BTC/USD",), None, 9),
        TokenSpec("open", "cd" * 32),
    ]
    config = worker_config(tokens, True, limits, None, "debug", 4, symbols=("BTC/USD",))
    assert config.limits.max_connections == 250
    assert config.limits.max_connections_per_ip == 3
    assert config.limits.max_message_size == limits.max_message_size
    assert [t.max_connections for t in config.tokens] == [3, None]
    assert config.tokens[0].symbols == ("BTC/USD",)
    assert WorkerConfig.load(config.dump()) == config


def test_a_store_rebuilt_from_its_specs_authenticates_alike() -> None:
    store = TokenStore([TokenSpec("a", DIGEST, ("ETH/USD", "BTC/USD"), None, 2)])
    rebuilt = TokenStore(store.specs())
    assert rebuilt.grant("a") == store.grant("a")
    assert rebuilt.revoked_since(store, store._clock()) == {}


def report(**values: object) -> dict[str, object]:
    stats = Stats()
    for name, value in values.items():
        setattr(stats, name, value)
    return report_fields(stats)


def test_counters_are_summed_over_workers_and_kept_when_a_worker_ends() -> None:
    book = StatsBook()
    book.report(0, report(messages_sent=10, clients_connected=3), subscribers=3)
    book.report(1, report(messages_sent=5, clients_connected=2), subscribers=1)
    stats = Stats(updates_published=7)
    book.merge_into(stats)
    assert (stats.messages_sent, stats.clients_connected, stats.updates_published) == (15, 5, 7)
    assert book.subscriber_count() == 4
    book.retire(1)  # died: its clients are gone, what it sent stays counted
    book.report(1, report(messages_sent=1), subscribers=0)  # its replacement starts from 0
    book.merge_into(stats)
    assert (stats.messages_sent, stats.clients_connected) == (16, 3)


def test_labelled_counters_add_up_by_label() -> None:
    first, second = Stats(), Stats()
    first.disconnects["client_closed"] += 2
    second.disconnects["client_closed"] += 1
    second.disconnects["socket_error"] += 1
    book = StatsBook()
    book.report(0, report_fields(first), subscribers=0)
    book.report(1, report_fields(second), subscribers=0)
    book.count_own("rejected_upgrades", "unavailable")
    stats = Stats()
    book.merge_into(stats)
    assert stats.disconnects == {"client_closed": 3, "socket_error": 1}
    assert stats.rejected_upgrades == {"unavailable": 1}


def test_a_connection_goes_to_the_ready_worker_with_the_fewest_clients() -> None:
    placement = Placement()
    placement.reported(0, 10, taken=0)
    placement.reported(1, 7, taken=0)
    picks = []
    for _ in range(6):  # a burst between two reports: counted as handed
        chosen = placement.pick([0, 1])
        assert chosen is not None
        placement.handed(chosen)
        picks.append(chosen)
    assert picks == [1, 1, 1, 0, 1, 0]  # 7 → 10 first, then in turn (ties: the lowest)
    # A report that counts only some of what was handed (the rest still queued for the
    # worker) keeps counting the rest: worker 1 took 2 of its 4, and has 9 clients.
    placement.reported(1, 9, taken=2)
    assert placement.load(1) == 11 and placement.load(0) == 12
    placement.forget(1)  # restarted empty: it takes the new ones until it catches up
    assert [placement.pick([0, 1]) for _ in range(2)] == [1, 1]
    assert placement.pick([0]) == 0
    assert placement.pick([]) is None
