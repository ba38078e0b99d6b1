"""The transaction contract: the bulk parser and the record-by-record parser agree exactly."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from fraud_streams import BAD_RECORDS, troubled_stream

from models.schema import (
    RESCUED_DATA,
    TRANSACTION_SCHEMA,
    _route,
    parse_each,
    parse_records,
    to_payload,
)
from models.simulate import Simulation

GOOD = {
    "transaction_id": "t1",
    "event_time": "2026-01-02T03:04:05.123456Z",
    "customer_id": "C1",
    "terminal_id": "T1",
    "amount": 12.5,
    "kind": "debit",
    "channel": "pos",
    "location": "L1",
}


def variant(**changes: object) -> bytes:
    record = {**GOOD, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


CASES: list[tuple[bytes, str | None]] = [
    (variant(), None),
    (variant(transaction_id="t2", channel=None, location=...), None),
    (variant(transaction_id="t3", event_time="2026-01-02T05:04:05+02:00"), None),
    (variant(transaction_id="t4", amount=7), None),
    (variant(transaction_id="t5", extra_field={"nested": [1]}), None),
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "record is a JSON list"),
    (b'"just a string"', "record is a JSON str"),
    (variant(amount=...), "missing required field(s): amount"),
    (variant(customer_id=None), "missing required field(s): customer_id"),
    (variant(amount="12"), "amount must be a number"),
    (variant(amount=True), "amount must be a number"),
    (variant(amount=-1), "amount must be a finite number > 0"),
    (variant(amount=0), "amount must be a finite number > 0"),
    (
        b'{"transaction_id":"n","event_time":"2026-01-02T03:04:05Z","customer_id":"C","terminal_id"'
        b':"T","amount":NaN,"kind":"debit"}',
        "amount must be a finite number > 0",
    ),
    (variant(amount=10**400), "amount must be a finite number > 0"),
    (variant(kind="refund"), "kind must be one of debit|credit"),
    (variant(channel="fax"), "channel must be one of"),
    (variant(channel=""), "channel must be one of"),
    (variant(location=""), "location must be a non-empty string"),
    (variant(location=5), "location must be a non-empty string"),
    (variant(customer_id=""), "customer_id must be a non-empty string"),
    (variant(terminal_id=17), "terminal_id must be a non-empty string"),
    (variant(event_time="yesterday"), "event_time is not an ISO-8601 timestamp"),
    (variant(event_time="2026-01-02T03:04:05"), "event_time has no time zone"),
    (variant(event_time=1767225600), "event_time must be an ISO-8601 string"),
    (json.dumps(GOOD, indent=2).encode(), None),  # multi-line JSON is still one record
    (b"\xff\xfe garbage", "not valid JSON"),
    # What a file source rescued: an object, kept as canonical JSON (null: none).
    (variant(transaction_id="r1", _rescued_data={"merchant": "m", "_file_path": "/in/b"}), None),
    (variant(transaction_id="r2", _rescued_data={"z": 1, "a": {"c": [2, "x"], "b": None}}), None),
    (variant(transaction_id="r3", _rescued_data={}), None),
    (variant(transaction_id="r4", _rescued_data=None), None),
    (variant(transaction_id="r5", _rescued_data={"amount": "12"}, amount=...), "missing required"),
    (variant(transaction_id="r6").replace(b'"}', b'","\\u005frescued_data":{"k":"v"}}'), None),
    (json.dumps({**GOOD, "_rescued_data": {"k": 1}}, indent=1).encode(), None),
    (variant(_rescued_data=5), "_rescued_data must be a JSON object, got a JSON int"),
    (variant(_rescued_data=[{"k": 1}]), "_rescued_data must be a JSON object, got a JSON list"),
    (variant(_rescued_data="{}"), "_rescued_data must be a JSON object, got a JSON str"),
    (variant(_rescued_data={"x": float("nan")}), "_rescued_data holds a number JSON cannot"),
]


@pytest.mark.parametrize(("payload", "reason"), CASES)
def test_each_case_alone(payload: bytes, reason: str | None) -> None:
    result = parse_records([payload])
    if reason is None:
        assert result.valid.num_rows == 1 and not result.rejected
    else:
        assert result.valid.num_rows == 0
        assert len(result.rejected) == 1 and reason in result.rejected[0].reason


def test_bulk_and_record_by_record_agree_on_a_mixed_batch() -> None:
    payloads = []
    for i in range(10 * len(CASES)):  # good records with every other case spread among them
        payloads.append(variant(transaction_id=f"g{i}", amount=1 + i))
        if i % 10 == 0:
            payloads.append(CASES[(i // 10) % len(CASES)][0])
    bulk, each = parse_records(payloads), parse_each(payloads)
    assert bulk.valid.equals(each.valid)
    assert [(r.index, r.reason) for r in bulk.rejected] == [
        (r.index, r.reason) for r in each.rejected
    ]
    assert bulk.valid.num_rows + len(bulk.rejected) == len(payloads)
    names = [*TRANSACTION_SCHEMA.names, RESCUED_DATA, "record_index"]
    assert bulk.valid.column_names == names
    assert bulk.valid.select(TRANSACTION_SCHEMA.names).schema == TRANSACTION_SCHEMA
    assert bulk.valid.schema.field(RESCUED_DATA).type == pa.string()
    assert bulk.valid[RESCUED_DATA].null_count < bulk.valid.num_rows  # rescued ones were there


def test_rescued_data_is_kept_as_canonical_json() -> None:
    rescued = {"z": 1, "a": {"c": [2, "x"], "b": None}, "_file_path": "/in/é.jsonl"}
    payloads = [variant(transaction_id=f"t{i}", _rescued_data=rescued) for i in range(3)]
    payloads += [
        variant(transaction_id="plain"),
        json.dumps(GOOD | {"_rescued_data": rescued}, indent=2).encode(),
    ]
    for parsed in (parse_records(payloads), parse_each(payloads)):
        assert parsed.valid[RESCUED_DATA].to_pylist() == [
            json.dumps(rescued, sort_keys=True, separators=(",", ":"))
        ] * 3 + [None, json.dumps(rescued, sort_keys=True, separators=(",", ":"))]


def test_payload_round_trip() -> None:
    parsed = parse_records([variant()]).valid
    again = parse_records([to_payload(parsed.to_pylist()[0])]).valid
    assert parsed.num_rows == 1 and again.equals(parsed)


def assert_paths_agree(payloads: list[bytes]) -> None:
    """The bulk parser and the record-by-record parser: same rows, same rejects, same reasons."""
    bulk, each = parse_records(payloads), parse_each(payloads)
    assert bulk.valid.equals(each.valid)
    assert bulk.valid.schema == each.valid.schema
    assert [(r.index, r.payload, r.reason) for r in bulk.rejected] == [
        (r.index, r.payload, r.reason) for r in each.rejected
    ]
    assert bulk.valid.num_rows + len(bulk.rejected) == len(payloads)


def test_fast_path_and_record_by_record_agree_on_the_project_bad_records(
    small_sim: Simulation,
) -> None:
    rows = small_sim.transactions.slice(0, 3000).to_pylist()
    # What could fool a bulk read of newline-joined records: blank lines (skipped by the reader,
    # which would shift every later row) next to two documents on one line (read as two rows),
    # a leading blank, records longer than a read block, line breaks inside a record.
    one_line = [
        b"",
        b"   ",
        b"\t",
        variant(transaction_id="two-1") + variant(transaction_id="two-2"),
        b" " + variant(transaction_id="lead"),
        variant(transaction_id="big", location="L" * (3 << 20)),
    ]
    line_breaks = [
        variant(transaction_id="trail") + b"\n",
        variant(transaction_id="crlf") + b"\r\n",
    ]
    bad = [p for p, _ in BAD_RECORDS] + [p for p, reason in CASES if reason]
    for tricky in (one_line, one_line + line_breaks):
        payloads, _ = troubled_stream(rows, bad + tricky, replay_of=10, retry_at=20)
        payloads = [b"", *payloads, b"  "]  # blank at both ends of the block too
        assert_paths_agree(payloads)
        parsed = parse_records(payloads)
        reasons = {r.payload: r.reason for r in parsed.rejected}
        for payload, reason in BAD_RECORDS:
            assert reason in reasons[payload]
        kept = set(parsed.valid["transaction_id"].to_pylist())
        assert {"lead", "big"} <= kept and not {"two-1", "two-2"} & kept
    assert {"trail", "crlf"} <= kept


def test_a_batch_is_read_as_one_block_only_when_that_is_safe() -> None:
    clean = [variant(transaction_id=f"c{i}", amount=1 + i) for i in range(500)]
    alone, bulk, block, _ = _route(clean)
    assert alone == [] and bulk == list(range(500)) and block == b"\n".join(clean)
    assert_paths_agree(clean)
    assert parse_records(clean).valid["record_index"].to_pylist() == list(range(500))
    for trouble in (b"", b" \t", variant() + b"\n", variant() + b"\r"):
        mixed = [*clean[:250], trouble, *clean[250:]]
        alone, bulk, block, _ = _route(mixed)
        assert block is None and alone == [250] and len(bulk) == 500
        assert_paths_agree(mixed)
    # One blank line (a row fewer) and one line of two documents (a row more): the row count
    # still matches, so only routing the blank alone keeps every row on its own record.
    two = variant(transaction_id="x") + variant(transaction_id="y")
    assert_paths_agree([*clean[:100], b"", *clean[100:300], two, *clean[300:]])
