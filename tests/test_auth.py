"""auth: where the token comes from, how it is checked, what a grant allows."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import quote

import pytest

from agentspoonsd.auth import (
    ANONYMOUS,
    AuthFailure,
    Grant,
    TokenSpec,
    TokenStore,
    hash_token,
    new_token,
    presented_token,
)

DASHBOARD = "s3cret-dashboard-token"
ETH_ONLY = "eth-only-token"


def token(name: str, secret: str, symbols: list[str] | None = None) -> TokenSpec:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return TokenSpec(name, digest, ("*",) if symbols is None else tuple(symbols))


@pytest.fixture
def store() -> TokenStore:
    return TokenStore([token("dashboard", DASHBOARD), token("eth", ETH_ONLY, ["ETH/USD"])])


# --- presented_token ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_header_any_case(scheme: str) -> None:
    headers = [(b"host", b"x"), (b"authorization", f"{scheme} abc.DEF-123".encode())]
    assert presented_token("/", headers) == "abc.DEF-123"


def test_header_name_is_case_insensitive_and_whitespace_trimmed() -> None:
    assert presented_token("/", [(b"Authorization", b"  Bearer   tok  ")]) == "tok"


def test_header_wins_over_query() -> None:
    headers = [(b"authorization", b"Bearer from-header")]
    assert presented_token("/?access_token=from-query", headers) == "from-header"


@pytest.mark.parametrize("value", [b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer    ", b"", b"tok"])
def test_unusable_authorization_header_gives_none(value: bytes) -> None:
    # An Authorization header that is not a usable bearer credential is not silently replaced
    # by the query parameter: the client said how it authenticates, and that is refused.
    assert presented_token("/?access_token=q", [(b"authorization", value)]) is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/?access_token=abc", "abc"),
        ("/stream?x=1&access_token=abc&y=2", "abc"),
        ("/?access_token=" + quote("a/b+c=d&e é", safe=""), "a/b+c=d&e é"),
        ("/?access_token=a%2Bb", "a+b"),
        ("/?access_token=first&access_token=second", "first"),
        ("/", None),
        ("/?other=1", None),
        ("/?access_token=", None),
        ("/?ACCESS_TOKEN=abc", None),
        ("/access_token=abc", None),
    ],
)
def test_query_parameter(target: str, expected: str | None) -> None:
    assert presented_token(target, [(b"host", b"example")]) == expected


def test_no_token_at_all() -> None:
    assert presented_token("/", []) is None


def test_new_token_round_trips_through_the_query() -> None:
    secret = new_token()
    assert presented_token(f"/?access_token={quote(secret, safe='')}", []) == secret


# --- TokenStore -----------------------------------------------------------------------------------


def test_accepts_a_configured_token(store: TokenStore) -> None:
    grant = store.authenticate(DASHBOARD)
    assert grant == Grant("dashboard", frozenset({"*"}))
    grant = store.authenticate(ETH_ONLY)
    assert isinstance(grant, Grant)
    assert grant.name == "eth" and grant.symbols == frozenset({"ETH/USD"})


@pytest.mark.parametrize(
    "wrong",
    [
        "nope",
        DASHBOARD + "x",
        DASHBOARD[:-1],
        DASHBOARD.upper(),
        " " + DASHBOARD,
        hashlib.sha256(DASHBOARD.encode()).hexdigest(),  # the digest is not the token
        "\udcff",  # not encodable as UTF-8: must not raise
    ],
)
def test_rejects_a_wrong_token(store: TokenStore, wrong: str) -> None:
    assert store.authenticate(wrong) is AuthFailure.INVALID


@pytest.mark.parametrize("missing", [None, ""])
def test_missing_token(store: TokenStore, missing: str | None) -> None:
    assert store.authenticate(missing) is AuthFailure.MISSING


def test_no_tokens_configured_rejects_everyone() -> None:
    empty = TokenStore([])
    assert len(empty) == 0
    assert empty.authenticate("anything") is AuthFailure.INVALID
    assert empty.authenticate(None) is AuthFailure.MISSING


def test_disabled_auth_serves_anyone_anonymously(store: TokenStore) -> None:
    disabled = TokenStore([token("dashboard", DASHBOARD)], enabled=False)
    assert disabled.enabled is False
    for presented in (None, "", "wrong", DASHBOARD):
        assert disabled.authenticate(presented) is ANONYMOUS
    assert ANONYMOUS.allows("ANY/THING")


def test_store_size(store: TokenStore) -> None:
    assert len(store) == 2


def test_failure_labels_are_stable() -> None:
    assert AuthFailure.MISSING.value == "missing_token"
    assert AuthFailure.INVALID.value == "invalid_token"


def test_header_and_query_tokens_authenticate_alike(store: TokenStore) -> None:
    via_header = presented_token("/", [(b"authorization", f"Bearer {DASHBOARD}".encode())])
    via_query = presented_token(f"/?access_token={DASHBOARD}", [])
    assert store.authenticate(via_header) == store.authenticate(via_query) != AuthFailure.INVALID


# --- Grant ----------------------------------------------------------------------------------------


def test_grant_wildcard_allows_everything() -> None:
    grant = Grant("all", frozenset({"*"}))
    assert grant.allows("BTC/USD") and grant.allows("ETH/USD") and grant.allows("")


def test_grant_explicit_list() -> None:
    grant = Grant("some", frozenset({"BTC/USD", "ETH/USD"}))
    assert grant.allows("BTC/USD") and grant.allows("ETH/USD")
    assert not grant.allows("SOL/USD")
    assert not grant.allows("btc/usd")  # symbols are exact
    assert not grant.allows("*")
    assert not Grant("none", frozenset()).allows("BTC/USD")


def test_grant_with_wildcard_among_others() -> None:
    assert Grant("mixed", frozenset({"BTC/USD", "*"})).allows("XRP/USD")


# --- hash_token and new_token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret", ["", "abc", "ünïcødé-🔑", new_token()], ids=["empty", "ascii", "unicode", "new"]
)
def test_hash_token_is_sha256_hex(secret: str) -> None:
    assert hash_token(secret) == hashlib.sha256(secret.encode("utf-8")).hexdigest()


def test_hashed_new_token_is_accepted() -> None:
    secret = new_token()
    store = TokenStore([TokenSpec(name="fresh", sha256=hash_token(secret))])
    assert isinstance(store.authenticate(secret), Grant)


def test_new_token_is_long_url_safe_and_random() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for t in tokens:
        assert len(t) >= 43  # 256 bits in base64url
        assert re.fullmatch(r"[A-Za-z0-9_-]+", t)


def test_new_tokens_never_start_with_a_dash() -> None:
    """One in 64 random URL-safe tokens would, and then `--token TOKEN` reads it as an option."""
    tokens = [new_token() for _ in range(2000)]
    assert not any(t.startswith("-") for t in tokens)
    assert len(set(tokens)) == 2000 and {len(t) for t in tokens} == {43}
