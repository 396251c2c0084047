"""docs/asyncapi.yaml cannot drift: it is a valid AsyncAPI 3.0 document, it says what
docs/PROTOCOL.md says, and every message a real daemon sends (and every request the tests send)
matches its schema.

The document is checked against the official AsyncAPI 3.0.0 JSON Schema, vendored with its
licence under tests/vendor/asyncapi/ (from the `@asyncapi/specs` npm package). Payloads are
AsyncAPI Schema Objects, a superset of JSON Schema Draft 07, so they are validated with
`jsonschema`'s Draft 7 validator, the whole document registered as one resource so that its
`#/components/...` references resolve.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT7
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from daemon_process import DaemonProcess, config_text, new_token, token_block
from helpers import bearer

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "docs" / "asyncapi.yaml"
PROTOCOL_MD = ROOT / "docs" / "PROTOCOL.md"
ASYNCAPI_SCHEMA = Path(__file__).resolve().parent / "vendor" / "asyncapi" / "asyncapi-3.0.0.json"
SPEC_URI = "urn:agentspoonsd:asyncapi"

SYMBOLS = ("BTC/USD", "ETH/USD")
RATE_LIMIT = 20  # server.max_client_messages_per_second of the test daemon
ERROR_LIMIT = 200  # server.max_client_errors: high, so the error tests are not cut short


# --- the document --------------------------------------------------------------------------------


def _pointer(document: Any, ref: str) -> Any:
    """The node a local reference (`#/a/b~1c`) points to; KeyError if there is none."""
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _refs(node: Any, path: str = "#") -> Iterator[tuple[str, str]]:
    """Every (location, $ref) in the document."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield path, node["$ref"]
        for key, value in node.items():
            yield from _refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _refs(value, f"{path}/{index}")


@dataclass
class Spec:
    """docs/asyncapi.yaml, with a validator per message and the messages of each direction."""

    doc: dict[str, Any]
    registry: Registry = field(init=False)
    server_types: dict[str, str] = field(init=False)  # wire `type` -> components.messages key
    client_types: dict[str, str] = field(init=False)
    replies: dict[str, set[str]] = field(init=False)  # request type -> reply types

    def __post_init__(self) -> None:
        self.registry = Registry().with_resource(SPEC_URI, DRAFT7.create_resource(self.doc))
        self.server_types, self.client_types, self.replies = {}, {}, {}
        for operation in self.doc["operations"].values():
            sent = self.doc_types(operation.get("messages", []))
            if operation["action"] == "send":
                self._add(self.server_types, sent)
            else:
                self._add(self.client_types, sent)
                replied = self.doc_types(operation.get("reply", {}).get("messages", []))
                self._add(self.server_types, replied)
                for request_type in sent:
                    self.replies[request_type] = set(replied)

    @staticmethod
    def _add(table: dict[str, str], found: dict[str, str]) -> None:
        for wire_type, key in found.items():
            assert table.get(wire_type, key) == key, f"two messages of type {wire_type!r}"
            table[wire_type] = key

    def message_key(self, ref: str) -> str:
        """components.messages key of a `#/channels/.../messages/X` reference."""
        target = _pointer(self.doc, ref)
        inner = target.get("$ref", "")
        assert inner.startswith("#/components/messages/"), f"{ref} is not a component message"
        return inner.rsplit("/", 1)[1]

    def type_of(self, key: str) -> str:
        """The wire `type` (the payload's `type` const) of a component message."""
        payload = self.payload(key)
        return payload["properties"]["type"]["const"]

    def payload(self, key: str) -> dict[str, Any]:
        payload = self.doc["components"]["messages"][key]["payload"]
        return _pointer(self.doc, payload["$ref"]) if "$ref" in payload else payload

    def doc_types(self, refs: list[dict[str, str]]) -> dict[str, str]:
        keys = [self.message_key(ref["$ref"]) for ref in refs]
        return {self.type_of(key): key for key in keys}

    def validator(self, key: str) -> Draft7Validator:
        return Draft7Validator(
            {"$ref": f"{SPEC_URI}#/components/messages/{key}/payload"}, registry=self.registry
        )

    def schema_validator(self, name: str) -> Draft7Validator:
        return Draft7Validator(
            {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=self.registry
        )

    def problems(self, key: str, instance: Any) -> str | None:
        """Why `instance` does not match message `key` (or a field is undocumented); None if ok."""
        error = best_match(self.validator(key).iter_errors(instance))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(top)"
            return f"{where}: {error.message}"
        undocumented = list(self.undocumented(self.doc["components"]["messages"][key], instance))
        if undocumented:
            return f"fields not in the spec: {undocumented}"
        return None

    def undocumented(self, schema: Any, instance: Any, path: str = "") -> Iterator[str]:
        """Fields of `instance` that `schema` does not list: new fields must be documented."""
        while isinstance(schema, dict) and ("$ref" in schema or "payload" in schema):
            schema = _pointer(self.doc, schema["$ref"]) if "$ref" in schema else schema["payload"]
        if not isinstance(schema, dict):
            return
        if isinstance(instance, dict) and "properties" in schema:
            properties = schema["properties"]
            for name, value in instance.items():
                if name not in properties:
                    yield f"{path}/{name}"
                else:
                    yield from self.undocumented(properties[name], value, f"{path}/{name}")
        elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(instance):
                yield from self.undocumented(schema["items"], item, f"{path}/{index}")

    def check_server(self, message: Any) -> None:
        wire_type = message.get("type") if isinstance(message, dict) else None
        key = self.server_types.get(wire_type)  # type: ignore[arg-type]
        assert key is not None, f"the spec has no server message of type {wire_type!r}: {message}"
        problem = self.problems(key, message)
        assert problem is None, f"{wire_type} does not match the spec: {problem}\n{message}"

    def accepts_request(self, request: Any) -> bool:
        """True when some client message schema accepts `request`."""
        return any(self.validator(key).is_valid(request) for key in self.client_types.values())


@pytest.fixture(scope="module")
def spec() -> Spec:
    return Spec(yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8")))


def test_document_is_a_valid_asyncapi_3_document(spec: Spec) -> None:
    meta = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    assert meta["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    assert spec.doc["asyncapi"] == "3.0.0"
    registry = Registry().with_resource(meta["$id"], DRAFT7.create_resource(meta))
    validator = Draft7Validator(meta, registry=registry)
    errors = sorted(validator.iter_errors(spec.doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        "/".join(str(p) for p in e.absolute_path) + f": {e.message[:300]}" for e in errors
    )
    # The official schema is no rubber stamp: it rejects a broken document.
    broken = copy.deepcopy(spec.doc)
    broken["operations"]["receivePing"]["action"] = "publish"  # AsyncAPI 2 vocabulary
    assert not validator.is_valid(broken)


def test_references_resolve_and_operations_fit_their_channel(spec: Spec) -> None:
    doc = spec.doc
    for where, ref in _refs(doc):
        try:
            _pointer(doc, ref)
        except (KeyError, IndexError, ValueError):
            pytest.fail(f"{where}: $ref {ref} points nowhere")

    (channel_name,) = doc["channels"]  # one WebSocket connection, one channel
    channel = doc["channels"][channel_name]
    channel_refs = {f"#/channels/{channel_name}/messages/{k}" for k in channel["messages"]}
    component_refs = {f"#/components/messages/{k}" for k in doc["components"]["messages"]}
    assert {m["$ref"] for m in channel["messages"].values()} == component_refs

    used: set[str] = set()
    for name, operation in doc["operations"].items():
        assert operation["channel"]["$ref"] == f"#/channels/{channel_name}", name
        refs = {m["$ref"] for m in operation["messages"]}
        assert refs and refs <= channel_refs, f"{name}: messages not in the channel"
        used |= refs
        if "reply" in operation:
            assert operation["action"] == "receive", f"{name}: the server answers requests"
            assert operation["reply"]["channel"]["$ref"] == f"#/channels/{channel_name}"
            replies = {m["$ref"] for m in operation["reply"]["messages"]}
            assert replies and replies <= channel_refs, f"{name}: replies not in the channel"
            used |= replies
    assert used == channel_refs, f"messages no operation sends: {channel_refs - used}"

    # A message's name is its wire `type`; each type has one schema per direction.
    for key, message in doc["components"]["messages"].items():
        assert message["name"] == spec.type_of(key), key
    assert set(spec.server_types.values()) | set(spec.client_types.values()) == set(
        doc["components"]["messages"]
    )
    assert set(spec.server_types) == {
        "connected",
        "volatility_update",
        "pong",
        "subscribed",
        "unsubscribed",
        "history",
        "reset",
        "error",
    }
    assert set(spec.client_types) == {"ping", "subscribe", "unsubscribe", "history", "resume"}

    for name, schema in doc["components"]["schemas"].items():
        try:
            Draft7Validator.check_schema(schema)
        except Exception as exc:  # SchemaError
            pytest.fail(f"components/schemas/{name} is not a Draft 07 schema: {exc}")


def test_every_example_matches_its_message(spec: Spec) -> None:
    checked = 0
    for key, message in spec.doc["components"]["messages"].items():
        assert message.get("examples"), f"{key} has no example"
        for example in message["examples"]:
            assert spec.problems(key, example["payload"]) is None, (key, example["payload"])
            checked += 1
    assert checked >= len(spec.doc["components"]["messages"])


def _example(spec: Spec, key: str) -> dict[str, Any]:
    return copy.deepcopy(spec.doc["components"]["messages"][key]["examples"][0]["payload"])


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(message: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = message
        for part in parents:
            node = node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()

# (message, mutation, still valid?): the schemas are strict where the protocol is, and open to
# new fields in server messages only.
MUTATIONS = [
    ("volatilityUpdate", _set("data.brand_new_field", 1), True),
    ("volatilityUpdate", _set("brand_new_field", "x"), True),
    ("volatilityUpdate", _set("data.returns", None), True),
    ("volatilityUpdate", _set("data.seq", _DELETE), False),
    ("volatilityUpdate", _set("data.seq", "41"), False),
    ("volatilityUpdate", _set("data.seq", 2**53), False),
    ("volatilityUpdate", _set("data.close", None), False),
    ("volatilityUpdate", _set("data.volume", -1.0), False),
    ("volatilityUpdate", _set("data.timestamp", "2025-01-01 00:01:00"), False),
    ("volatilityUpdate", _set("data.estimators.yang_zhang", _DELETE), False),
    ("volatilityUpdate", _set("data.estimators.window", 2.5), False),
    ("volatilityUpdate", _set("data.estimators_annualized.ewma", -0.1), False),
    ("volatilityUpdate", _set("data.garch_forecast.status", "converged"), False),
    ("volatilityUpdate", _set("data.garch_forecast.omega", None), False),  # status ok
    ("volatilityUpdate", _set("data.garch_forecast.bars_since_fit", _DELETE), False),
    ("volatilityUpdate", _set("data.garch_forecast.persistence", 1.0), False),
    ("volatilityUpdate", _set("data.garch_forecast.status", "pending"), False),  # values set
    ("volatilityUpdate", _set("data.garch_forecast.status", "nonstationary"), True),
    ("volatilityUpdate", _set("data.garch_forecast.status", "failed"), False),  # no message
    ("volatilityUpdate", _set("type", "volatility"), False),
    ("connected", _set("available", _DELETE), False),
    ("connected", _set("symbols", ["BTC/USD", "BTC/USD"]), False),
    ("connected", _set("history_size", 0), False),
    ("connected", _set("extra", {"a": 1}), True),
    ("error", _set("code", "teapot"), False),
    ("error", _set("message", _DELETE), False),
    ("error", _set("detail", "more"), True),
    ("reset", _set("latest_seq", _DELETE), False),
    ("pong", _set("timestamp", 1764094877), False),
    ("subscribed", _set("symbols", "BTC/USD"), False),
    ("historyReply", _set("updates", [{"seq": 1}]), False),
    ("ping", _set("id", 1), False),  # requests are closed
    ("subscribe", _set("symbols", []), False),
    ("subscribe", _set("symbols", [""]), False),
    ("unsubscribe", _set("symbols", "*"), False),
    ("historyRequest", _set("limit", 0), False),
    ("historyRequest", _set("limit", 10.5), False),
    ("historyRequest", _set("symbol", _DELETE), False),
    ("resume", _set("from", {}), False),
    ("resume", _set("from", {"BTC/USD": -1}), False),
    ("resume", _set("from", {"BTC/USD": "41"}), False),
]


@pytest.mark.parametrize(("key", "mutate", "valid"), MUTATIONS)
def test_schemas_accept_and_reject_as_the_protocol_does(
    spec: Spec, key: str, mutate: Callable[[dict[str, Any]], None], valid: bool
) -> None:
    message = _example(spec, key)
    mutate(message)
    assert spec.validator(key).is_valid(message) is valid, message


def _section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    stop = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    return rest[: stop.start()] if stop else rest


def test_spec_says_what_protocol_md_says(spec: Spec) -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    schemas = spec.doc["components"]["schemas"]

    codes = re.findall(r"^\| `([a-z_]+)` \|", _section(text, "### `error`"), re.M)
    assert codes and codes == schemas["Error"]["properties"]["code"]["enum"]

    requests = _section(text, "## Client → server")
    assert set(re.findall(r'\{"type": "(\w+)"', requests)) == set(spec.client_types)

    table = re.findall(r'^\| `(\w+)` \| `\{"type": "(\w+)"', _section(text, "### Replies"), re.M)
    assert len(table) == len(spec.client_types)
    for request_type, reply_type in table:
        assert spec.replies[request_type] == {reply_type, "error"}, request_type

    server_types = set(re.findall(r"^### `(\w+)`", text, re.M)) | {r for _, r in table}
    server_types |= set(re.findall(r'^\{"type": "(\w+)"', _section(text, "## Connecting"), re.M))
    assert server_types == set(spec.server_types)

    connecting = _section(text, "## Connecting")
    url = re.search(r"^ws://\S+$", connecting, re.M)
    assert url is not None
    query = spec.doc["channels"]["stream"]["bindings"]["ws"]["query"]["properties"]
    assert set(re.findall(r"[?&](\w+)=", url.group(0))) == set(query)
    assert {"bearer", "accessToken"} == set(spec.doc["components"]["securitySchemes"])

    greeting = re.search(r"```json\n(\{.*?\})\n```", connecting, re.S)
    assert greeting is not None
    assert spec.problems("connected", json.loads(greeting.group(1))) is None


def _simulated(tmp_path: Path, config: str, steps: int) -> list[dict[str, Any]]:
    path = tmp_path / "simulate.toml"
    path.write_text(config)
    args = ["--config", str(path), "--steps", str(steps), "--seed", "3", "--format", "jsonl"]
    out = subprocess.run(
        [sys.executable, "-m", "agentspoonsd", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_update_data_schema_is_what_the_pipeline_publishes(spec: Spec, tmp_path: Path) -> None:
    """`agentspoonsd simulate` writes the daemon's `data` objects: from a cold start (nulls while
    the estimators warm up, GARCH pending, then fitted) and with fitting disabled."""
    cold = _simulated(tmp_path, '[generator]\nwarmup_bars = 0\nsymbols = ["BTC/USD"]\n', 260)
    disabled = _simulated(
        tmp_path, "[generator]\nwarmup_bars = 0\n[generator.garch_fit]\nenabled = false\n", 3
    )
    validator = spec.schema_validator("UpdateData")
    schemas = spec.doc["components"]["schemas"]
    for data in cold + disabled:
        error = best_match(validator.iter_errors(data))
        assert error is None, f"{error.message} in {data}"  # type: ignore[union-attr]
        # Every field the pipeline writes is in the spec, and every field the spec requires is
        # written: the field lists are the same.
        assert set(data) == set(schemas["UpdateData"]["properties"])
        assert set(data["estimators"]) == set(schemas["Estimators"]["properties"])
        assert set(data["estimators_annualized"]) == set(schemas["Estimators"]["properties"])
        assert set(data["garch_forecast"]) == set(schemas["GarchForecast"]["properties"])
    statuses = {d["garch_forecast"]["status"] for d in cold + disabled}
    assert {"pending", "ok", "disabled"} <= statuses
    assert cold[0]["returns"] is None and cold[0]["estimators"]["window"] == 0


# --- a real daemon ---------------------------------------------------------------------------


@dataclass
class Live:
    port: int
    full: str  # token for every symbol
    btc: str  # token for BTC/USD only
    none: str  # token for a symbol the daemon does not publish
    seen_types: Counter[str] = field(default_factory=Counter)
    seen_codes: Counter[str] = field(default_factory=Counter)
    sent_types: Counter[str] = field(default_factory=Counter)
    finished: set[str] = field(default_factory=set)

    def url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/{query}"


def _ws_port(daemon: DaemonProcess, within: float = 20.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for event in list(daemon.events):
            if event.get("event") == "listener_bound" and event.get("service") == "websocket":
                return int(event["address"].rsplit(":", 1)[1])
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError("the daemon did not start:\n" + "\n".join(daemon.raw_lines[-30:]))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    full, btc, none = new_token(), new_token(), new_token()
    path = tmp_path_factory.mktemp("spec") / "agentspoonsd.toml"
    path.write_text(
        config_text(tokens={"full": full}, interval=0.1, symbols=SYMBOLS)
        + token_block("btc", btc, ["BTC/USD"])
        + token_block("none", none, ["DOGE/USD"])
    )
    daemon = DaemonProcess(
        path,
        env={
            "AGENTSPOONSD_SERVER__MAX_CLIENT_MESSAGES_PER_SECOND": str(RATE_LIMIT),
            "AGENTSPOONSD_SERVER__MAX_CLIENT_ERRORS": str(ERROR_LIMIT),
        },
    )
    daemon.start()
    try:
        yield Live(_ws_port(daemon), full, btc, none)
    finally:
        daemon.kill()


class _Pacer:
    """Keeps the tests' requests under the daemon's per-second limit (except on purpose)."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.sent: deque[float] = deque()

    async def wait(self) -> None:
        while True:
            now = time.monotonic()
            while self.sent and self.sent[0] <= now - 1.0:
                self.sent.popleft()
            if len(self.sent) < self.per_second:
                self.sent.append(now)
                return
            await trio.sleep(self.sent[0] + 1.0 - now + 0.01)


PACER = _Pacer(RATE_LIMIT // 2)


class Session:
    """One connection. Every message received is checked against the spec, every request sent
    is checked too (valid ones must match a request schema, malformed ones must match none)."""

    def __init__(self, ws: WebSocketConnection, spec: Spec, live: Live) -> None:
        self.ws, self.spec, self.live = ws, spec, live
        self.updates: list[dict[str, Any]] = []  # set aside by `reply`

    async def recv(self, within: float = 5.0) -> dict[str, Any]:
        with trio.fail_after(within):
            raw = await self.ws.get_message()
        assert isinstance(raw, str), "the server sends text messages only"
        message = json.loads(raw)
        self.spec.check_server(message)
        self.live.seen_types[message["type"]] += 1
        if message["type"] == "error":
            self.live.seen_codes[message["code"]] += 1
        return message

    async def reply(self, within: float = 5.0) -> dict[str, Any]:
        """The next message that is not a `volatility_update` (those are kept in `updates`)."""
        with trio.fail_after(within):
            while (message := await self.recv())["type"] == "volatility_update":
                self.updates.append(message["data"])
        return message

    async def update(self, within: float = 5.0) -> dict[str, Any]:
        """The next update's `data` (set-aside ones first)."""
        if self.updates:
            return self.updates.pop(0)
        message = await self.recv(within)
        assert message["type"] == "volatility_update", message
        return message["data"]

    async def send(self, request: Any) -> None:
        """Send a request the spec allows."""
        assert self.spec.accepts_request(request), f"the spec rejects {request}"
        self.live.sent_types[request["type"]] += 1
        await PACER.wait()
        await self.ws.send_message(json.dumps(request))

    async def send_raw(self, text: str | bytes) -> None:
        """Send something malformed: if it is JSON, no request schema may accept it."""
        if isinstance(text, str):
            try:
                parsed = json.loads(text)
            except ValueError:
                pass
            else:
                assert not self.spec.accepts_request(parsed), f"the spec accepts {text}"
        await PACER.wait()
        await self.ws.send_message(text)


def _symbols_query(*symbols: str) -> str:
    return "?symbols=" + ",".join(quote(s, safe="") for s in symbols)


@asynccontextmanager
async def _connect(
    spec: Spec, live: Live, token: str, query: str = ""
) -> AsyncIterator[tuple[Session, dict[str, Any]]]:
    """A session and its `connected` message."""
    async with open_websocket_url(live.url(query), extra_headers=bearer(token)) as ws:
        session = Session(ws, spec, live)
        connected = await session.recv()
        assert connected["type"] == "connected", "the first message is always `connected`"
        yield session, connected


def _symbols(reply: dict[str, Any], expected_type: str) -> list[str]:
    """The subscription a `subscribed`/`unsubscribed` reply reports."""
    assert reply["type"] == expected_type, reply
    return reply["symbols"]


def _consecutive(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_live_connect_updates_and_ping(spec: Spec, live: Live) -> None:
    with trio.fail_after(15):
        async with _connect(spec, live, live.full) as (session, connected):
            assert connected["token"] == "full"
            assert connected["symbols"] == connected["available"] == list(SYMBOLS)
            seqs: dict[str, list[int]] = {s: [] for s in SYMBOLS}
            while min(len(v) for v in seqs.values()) < 3:
                data = await session.update()
                seqs[data["symbol"]].append(data["seq"])
            assert all(_consecutive(v) for v in seqs.values()), seqs
            await session.send({"type": "ping"})
            assert (await session.reply())["type"] == "pong"

        # Browsers put the token in the query instead.
        url = live.url(f"?access_token={live.full}&symbols=")
        async with open_websocket_url(url) as ws:
            session = Session(ws, spec, live)
            connected = await session.recv()
            assert connected["type"] == "connected" and connected["symbols"] == []
    live.finished.add("connect")


async def test_live_subscribe_and_unsubscribe(spec: Spec, live: Live) -> None:
    with trio.fail_after(15):
        async with _connect(spec, live, live.full, "?symbols=") as (session, connected):
            assert connected["symbols"] == []
            await session.send({"type": "subscribe", "symbols": ["BTC/USD"]})
            assert _symbols(await session.reply(), "subscribed") == ["BTC/USD"]
            assert not session.updates
            assert {(await session.update())["symbol"] for _ in range(3)} == {"BTC/USD"}

            await session.send({"type": "subscribe", "symbols": ["*"]})
            assert set((await session.reply())["symbols"]) == set(SYMBOLS)
            await session.send({"type": "unsubscribe", "symbols": ["ETH/USD"]})
            assert _symbols(await session.reply(), "unsubscribed") == ["BTC/USD"]

            # A request that produced an error changed nothing.
            await session.send({"type": "subscribe", "symbols": ["ETH/USD", "NOPE/USD"]})
            error = await session.reply()
            assert (error["code"], error["symbol"]) == ("unknown_symbol", "NOPE/USD")
            await session.send({"type": "subscribe", "symbols": ["BTC/USD"]})
            assert _symbols(await session.reply(), "subscribed") == ["BTC/USD"]

            await session.send({"type": "unsubscribe", "symbols": ["*"]})
            assert _symbols(await session.reply(), "unsubscribed") == []
            session.updates.clear()
            await trio.sleep(0.3)  # three intervals: nothing is sent any more
            await session.send({"type": "ping"})
            assert (await session.recv())["type"] == "pong"
    live.finished.add("subscribe")


async def test_live_token_limits_the_symbols(spec: Spec, live: Live) -> None:
    with trio.fail_after(15):
        async with _connect(spec, live, live.btc) as (session, connected):
            assert connected["token"] == "btc"
            assert connected["symbols"] == connected["available"] == ["BTC/USD"]
            await session.send({"type": "subscribe", "symbols": ["ETH/USD"]})
            error = await session.reply()
            assert (error["code"], error["symbol"]) == ("forbidden_symbol", "ETH/USD")
            await session.send({"type": "subscribe", "symbols": ["*"]})
            assert _symbols(await session.reply(), "subscribed") == ["BTC/USD"]
            await session.send({"type": "history", "symbol": "ETH/USD", "limit": 5})
            assert (await session.reply())["code"] == "forbidden_symbol"

        # Bad symbols in the URL: errors right after `connected`, the valid ones subscribed.
        query = _symbols_query("ETH/USD", "BTC/USD", "DOGE/USD")
        async with _connect(spec, live, live.btc, query) as (session, connected):
            assert connected["symbols"] == ["BTC/USD"]
            first, second = await session.recv(), await session.recv()
            assert (first["code"], first["symbol"]) == ("forbidden_symbol", "ETH/USD")
            assert (second["code"], second["symbol"]) == ("unknown_symbol", "DOGE/USD")

        # A token scoped to nothing the daemon publishes: told so, not a silent empty stream.
        async with _connect(spec, live, live.none) as (session, connected):
            assert connected["symbols"] == connected["available"] == []
            assert (await session.recv())["code"] == "no_symbols"
    live.finished.add("token")


async def test_live_history(spec: Spec, live: Live) -> None:
    with trio.fail_after(15):
        async with _connect(spec, live, live.full) as (session, connected):
            latest: dict[str, int] = {}
            counts: Counter[str] = Counter()
            while counts["BTC/USD"] < 3 or counts["ETH/USD"] < 1:  # the rings hold these at least
                data = await session.update()
                latest[data["symbol"]] = data["seq"]
                counts[data["symbol"]] += 1
            await session.send({"type": "history", "symbol": "BTC/USD", "limit": 3})
            reply = await session.reply()
            assert reply["type"] == "history" and reply["symbol"] == "BTC/USD"
            seqs = [u["seq"] for u in reply["updates"]]
            assert len(seqs) == 3 and _consecutive(seqs) and seqs[-1] >= latest["BTC/USD"]
            assert {u["symbol"] for u in reply["updates"]} == {"BTC/USD"}

            await session.send({"type": "history", "symbol": "ETH/USD"})  # default limit
            reply = await session.reply()
            seqs = [u["seq"] for u in reply["updates"]]
            assert 1 <= len(seqs) <= min(100, connected["history_size"]) and _consecutive(seqs)

            await session.send({"type": "history", "symbol": "XRP/USD", "limit": 1})
            assert (await session.reply())["code"] == "unknown_symbol"
            # Within the schema (it cannot know history_size), beyond this daemon's ring.
            too_many = {
                "type": "history",
                "symbol": "BTC/USD",
                "limit": 1 + connected["history_size"],
            }
            await session.send(too_many)
            assert (await session.reply())["code"] == "invalid_message"
    live.finished.add("history")


async def test_live_resume_replays_without_gap_and_resets(spec: Spec, live: Live) -> None:
    with trio.fail_after(20):
        async with _connect(spec, live, live.full, _symbols_query("BTC/USD")) as (watch, _):
            for _ in range(3):  # the ring now holds this seq and the two before it
                seq = (await watch.update())["seq"]

        async with _connect(spec, live, live.full, "?symbols=") as (session, _):
            await session.send({"type": "resume", "from": {"BTC/USD": seq - 2, "ETH/USD": 1}})
            subscribed = await session.recv()
            assert subscribed["type"] == "subscribed", "nothing live before the reply"
            assert set(subscribed["symbols"]) == set(SYMBOLS)
            received: dict[str, list[int]] = {s: [] for s in SYMBOLS}
            resets = []
            while min(len(v) for v in received.values()) < 4:
                message = await session.recv()
                if message["type"] == "reset":
                    assert not received[message["symbol"]], "reset comes before the updates"
                    resets.append(message)
                else:
                    assert message["type"] == "volatility_update", message
                    received[message["data"]["symbol"]].append(message["data"]["seq"])
            # BTC/USD: from the seq after the one given, replay then live, no gap, no duplicate.
            assert received["BTC/USD"][0] == seq - 1 and _consecutive(received["BTC/USD"])
            # ETH/USD: seq 1 is older than anything retained (seqs start at the start time).
            (reset,) = resets
            assert reset["symbol"] == "ETH/USD"
            assert 1 < reset["oldest_seq"] <= reset["latest_seq"] + 1
            assert received["ETH/USD"][0] == reset["oldest_seq"]
            assert _consecutive(received["ETH/USD"])

            await session.send({"type": "resume", "from": {"BTC/USD": seq}})
            error = await session.reply()
            assert (error["code"], error["symbol"]) == ("already_subscribed", "BTC/USD")

        # The same from the URL; a seq newer than anything issued resets too.
        query = (
            f"?resume={quote('BTC/USD', safe='')}:{seq - 1},{quote('ETH/USD', safe='')}:{2**53 - 1}"
        )
        async with _connect(spec, live, live.full, query) as (session, connected):
            assert set(connected["symbols"]) == set(SYMBOLS)
            received = {s: [] for s in SYMBOLS}
            resets = []
            while min(len(v) for v in received.values()) < 3:
                message = await session.recv()
                if message["type"] == "reset":
                    resets.append(message)
                elif message["type"] == "volatility_update":
                    received[message["data"]["symbol"]].append(message["data"]["seq"])
            assert received["BTC/USD"][0] == seq and _consecutive(received["BTC/USD"])
            (reset,) = resets
            assert reset["symbol"] == "ETH/USD" and reset["latest_seq"] < 2**53 - 1
            assert received["ETH/USD"][0] == reset["oldest_seq"]

        # `?resume=` alone receives the resumed symbols and nothing else.
        query = f"?resume={quote('BTC/USD', safe='')}:{seq}"
        async with _connect(spec, live, live.full, query) as (session, connected):
            assert connected["symbols"] == ["BTC/USD"]
            symbols = {(await session.update())["symbol"] for _ in range(4)}
            assert symbols == {"BTC/USD"}
    live.finished.add("resume")


MALFORMED: list[tuple[str | bytes, str]] = [
    ("not json", "invalid_json"),
    ("{'type': 'ping'}", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"type": 7}', "invalid_message"),
    ('{"kind": "ping"}', "invalid_message"),
    ('{"type": "teleport"}', "unknown_type"),
    ('{"type": "subscribe"}', "invalid_message"),
    ('{"type": "subscribe", "symbols": []}', "invalid_message"),
    ('{"type": "unsubscribe", "symbols": "ETH/USD"}', "invalid_message"),
    ('{"type": "history"}', "invalid_message"),
    ('{"type": "history", "symbol": "BTC/USD", "limit": 0}', "invalid_message"),
    ('{"type": "resume", "from": {}}', "invalid_message"),
    ('{"type": "resume", "from": {"BTC/USD": "41"}}', "invalid_message"),
    ('{"type": "resume", "from": {"BTC/USD": -1}}', "invalid_message"),
    (b"\x00binary", "binary_unsupported"),
]


async def test_live_malformed_requests_get_their_error_code(spec: Spec, live: Live) -> None:
    with trio.fail_after(20):
        async with _connect(spec, live, live.full, "?symbols=") as (session, _):
            for text, code in MALFORMED:
                await session.send_raw(text)
                reply = await session.recv()
                assert (reply["type"], reply["code"]) == ("error", code), text
            await session.send({"type": "ping"})
            assert (await session.recv())["type"] == "pong"  # still connected

        # A malformed `resume` parameter: an error right after `connected`.
        async with _connect(spec, live, live.full, "?resume=BTC%2FUSD:latest") as (session, _):
            assert (await session.reply())["code"] == "invalid_message"

        # Over server.max_message_size (default 64 KiB): the error, then the 1009 close.
        async with _connect(spec, live, live.full, "?symbols=") as (session, _):
            await session.ws.send_message("x" * (65536 + 1))
            assert (await session.recv())["code"] == "message_too_large"
            with pytest.raises(ConnectionClosed) as closed:
                await session.recv()
            assert closed.value.reason.code == 1009
    live.finished.add("malformed")


async def test_live_rate_limited(spec: Spec, live: Live) -> None:
    burst = 3 * RATE_LIMIT  # spread over two whole seconds at most, one of them gets > RATE_LIMIT
    with trio.fail_after(15):
        async with _connect(spec, live, live.full, "?symbols=") as (session, _):
            for _ in range(burst):
                await session.ws.send_message('{"type": "ping"}')
            replies = Counter()
            for _ in range(burst):  # one reply per message: a pong, or the error for dropping it
                reply = await session.recv()
                replies[reply.get("code", reply["type"])] += 1
            assert set(replies) == {"pong", "rate_limited"}, replies
            assert replies["pong"] >= RATE_LIMIT, replies
            await trio.sleep(1.1)
            await session.send({"type": "ping"})
            assert (await session.recv())["type"] == "pong"
    live.finished.add("rate")


LIVE_TESTS = {"connect", "subscribe", "token", "history", "resume", "malformed", "rate"}


def test_live_every_message_type_and_error_code_was_seen(spec: Spec, live: Live) -> None:
    """Runs last: the live tests above, together, met every message of the spec."""
    if live.finished != LIVE_TESTS:
        pytest.skip(f"needs every live test of this module; ran {sorted(live.finished)}")
    assert set(live.seen_types) == set(spec.server_types)
    assert set(live.seen_codes) == set(
        spec.doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    )
    assert set(live.sent_types) == set(spec.client_types)
