"""The event schema of SPEC section 7: wire form, validation, column order."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.core.events import (
    COLUMN_TYPES,
    COLUMNS,
    DnsEvent,
    Event,
    IpEvent,
    StorageEvent,
    event_from_json,
    event_to_json,
    events_from_json,
    format_time,
    new_event_id,
    parse_time,
)
from egressd.errors import ValidationError

T0 = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)


def dns_event(**kw) -> Event:
    base = dict(account_id="node-1", workspace_id="1001", event_id=new_event_id(),
                destination_type="DNS", destination="evil.example.com",
                dns_event=DnsEvent("evil.example.com", 3), storage_event=None, event_time=T0,
                access_type="DROP", network_source_type="GENERAL_COMPUTE", ip_event=None,
                workload_id="ws1-notebook", network_policy_id="restricted-etl", node="node-a")
    base.update(kw)
    return Event(**base)


def ip_event(**kw) -> Event:
    return dns_event(**{**dict(destination_type="IP", destination="203.0.113.9", dns_event=None,
                               ip_event=IpEvent("10.77.1.2", "203.0.113.9", 443, "TCP"),
                               access_type="LOG_ONLY_DENIAL", network_source_type="DBSQL"), **kw})


def storage_event(**kw) -> Event:
    host = "other.s3.us-west-2.amazonaws.com"
    return dns_event(**{**dict(
        destination_type="STORAGE", destination=host, dns_event=DnsEvent(host, 3),
        storage_event=StorageEvent(host, "/key/a.parquet", "bucket not allowed"),
        network_source_type="ML_SERVING"), **kw})


def test_columns_follow_spec_order():
    assert COLUMNS == (
        "account_id", "workspace_id", "event_id", "destination_type", "destination", "dns_event",
        "storage_event", "event_time", "access_type", "network_source_type", "ip_event",
        "workload_id", "network_policy_id", "node")
    assert COLUMN_TYPES["dns_event"] == "STRUCT(domain_name VARCHAR, rcode INTEGER)"
    assert COLUMN_TYPES["storage_event"] == (
        "STRUCT(hostname VARCHAR, path VARCHAR, rejection_reason VARCHAR)")
    assert COLUMN_TYPES["ip_event"] == ("STRUCT(source_ip VARCHAR, destination_ip VARCHAR, "
                                        "destination_port INTEGER, protocol VARCHAR)")
    assert COLUMN_TYPES["event_time"] == "TIMESTAMP"


@pytest.mark.parametrize("make", [dns_event, ip_event, storage_event])
def test_round_trip_every_type(make):
    e = make()
    doc = event_to_json(e)
    assert list(doc) == list(COLUMNS)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["event_time"] == "2024-05-01T12:00:00.123Z"
    assert event_from_json(doc) == e


def test_storage_without_dns_event_and_optional_fields():
    e = storage_event(dns_event=None, workload_id=None, network_policy_id=None, node=None,
                      network_source_type=None, storage_event=StorageEvent("x.blob.core.windows.net"))
    assert event_from_json(event_to_json(e)) == e


def test_ip_event_without_port_icmp():
    e = ip_event(ip_event=IpEvent("2001:db8::2", "2001:db8::9", None, "ICMPV6"))
    assert event_from_json(event_to_json(e)) == e


def test_event_time_is_normalised_to_utc_milliseconds():
    local = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    e = dns_event(event_time=local)
    assert e.event_time == T0
    assert e.event_time.tzinfo == timezone.utc
    assert format_time(e.event_time) == "2024-05-01T12:00:00.123Z"


@pytest.mark.parametrize("text", ["2024-05-01T12:00:00.123Z", "2024-05-01T14:00:00.123+02:00",
                                  "2024-05-01T12:00:00.123456Z", "2024-05-01T07:00:00.1235-05:00"])
def test_parse_time_accepts_z_and_offsets(text):
    assert parse_time(text) == T0


@pytest.mark.parametrize("text", ["2024-05-01T12:00:00", "2024-05-01", "yesterday", "", "12345",
                                  "2024-13-01T00:00:00Z", "0001-01-01T00:00:00+01:00"])
def test_parse_time_refuses(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_uuid_is_normalised_to_lower_case():
    doc = event_to_json(dns_event())
    doc["event_id"] = doc["event_id"].upper()
    assert event_from_json(doc).event_id == doc["event_id"].lower()


def _errors(docs) -> list[str]:
    with pytest.raises(ValidationError) as info:
        events_from_json(docs)
    return [str(e) for e in info.value.errors]


def _bad(change) -> list[str]:
    docs = [event_to_json(dns_event()) for _ in range(3)] + [event_to_json(dns_event())]
    change(docs[3])
    return _errors(docs)


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["dns_event"].update(rcode="3"), "[3].dns_event.rcode: expected an integer"),
    (lambda d: d["dns_event"].update(rcode=True), "[3].dns_event.rcode: expected an integer"),
    (lambda d: d["dns_event"].update(rcode=99999), "[3].dns_event.rcode: 99999 is not in"),
    (lambda d: d.update(access_type="ALLOW"), "[3].access_type: 'ALLOW' is not one of"),
    (lambda d: d.update(destination_type="URL"), "[3].destination_type: 'URL' is not one of"),
    (lambda d: d.update(event_id="42"), "[3].event_id: '42' is not a UUID"),
    (lambda d: d.update(event_id="{" + new_event_id() + "}"), "[3].event_id"),
    (lambda d: d.update(event_time="2024-05-01T12:00:00"), "[3].event_time: "),
    (lambda d: d.update(event_time=1714564800), "[3].event_time: expected an ISO-8601 string"),
    (lambda d: d.pop("account_id"), "[3].account_id: is required"),
    (lambda d: d.update(workspace_id=""), "[3].workspace_id: must not be empty"),
    (lambda d: d.update(workspace_id="a b"), "[3].workspace_id: 'a b' is not a valid"),
    (lambda d: d.update(dns_event=None), "[3].dns_event: is required for destination_type DNS"),
    (lambda d: d.update(ip_event={"source_ip": "10.0.0.1", "destination_ip": "10.0.0.2",
                                  "destination_port": 1, "protocol": "TCP"}),
     "[3].ip_event: must be null for destination_type DNS"),
    (lambda d: d.update(destination_type="IP"), "[3].ip_event: is required for destination_type IP"),
    (lambda d: d.update(destination_type="STORAGE"),
     "[3].storage_event: is required for destination_type STORAGE"),
    (lambda d: d.update(surprise=1), "[3].surprise: unknown field"),
    (lambda d: d["dns_event"].update(extra=1), "[3].dns_event.extra: unknown field"),
    (lambda d: d.update(dns_event=[]), "[3].dns_event: expected an object, got an array"),
    (lambda d: d.update(destination="x\ud800"), "[3].destination: contains a NUL or an unpaired"),
    (lambda d: d.update(destination="a\x00b"), "[3].destination: contains a NUL"),
    (lambda d: d.update(destination="x" * 5000), "[3].destination: is longer than"),
    (lambda d: d.update(network_source_type="LAPTOP"), "[3].network_source_type: 'LAPTOP'"),
])
def test_invalid_fields_are_named_with_their_path(change, expected):
    errors = _bad(change)
    assert any(e.startswith(expected) for e in errors), errors


def test_ip_event_fields_are_checked():
    doc = event_to_json(ip_event())
    doc["ip_event"].update(source_ip="10.0.0.300", destination_port=70000, protocol=None)
    errors = _errors([doc])
    assert "[0].ip_event.source_ip: '10.0.0.300' is not an IP address" in errors
    assert any(e.startswith("[0].ip_event.destination_port: 70000") for e in errors)
    assert "[0].ip_event.protocol: is required" in errors


def test_every_error_of_a_batch_is_reported():
    a, b = event_to_json(dns_event()), event_to_json(dns_event())
    a["access_type"] = "nope"
    b["dns_event"]["rcode"] = -1
    errors = _errors([a, b])
    assert errors[0].startswith("[0].access_type")
    assert errors[1].startswith("[1].dns_event.rcode")


def test_error_list_is_capped():
    docs = [{"bad": i} for i in range(100)]
    errors = _errors(docs)
    assert len(errors) == 21
    assert errors[-1].startswith("and ")


@pytest.mark.parametrize("docs", [{}, "x", None, 3, [1], [None], [[]]])
def test_wrong_shapes(docs):
    with pytest.raises(ValidationError):
        events_from_json(docs)


def test_empty_batch_is_valid():
    assert events_from_json([]) == []


# -- fuzzing ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(list(COLUMNS) + ["domain_name", "rcode", "x"]) | st.text(max_size=5),
        children, max_size=6),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=300, deadline=None)
def test_junk_raises_only_validation_error(value):
    try:
        event_from_json(value, "[0]")
    except ValidationError:
        pass


@given(st.sampled_from([dns_event, ip_event, storage_event]),
       st.sampled_from(COLUMNS + ("domain_name", "rcode", "source_ip", "destination_port")),
       json_values)
@settings(max_examples=500, deadline=None)
def test_mutated_events_raise_only_validation_error(make, key, junk):
    doc = copy.deepcopy(event_to_json(make()))
    targets = [doc] + [v for v in doc.values() if isinstance(v, dict)]
    for target in targets:
        if key in target:
            target[key] = junk
    try:
        e = event_from_json(doc)
    except ValidationError:
        return
    # Whatever was accepted survives a round trip unchanged.
    assert event_from_json(event_to_json(e)) == e
