"""Int-array attribute values decoded a request at a time (numpy) against the per-value path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from lightspan.collector import native
from lightspan.collector.decode import int_array_json, parse_protobuf
from lightspan.collector.int_arrays import int_arrays_json
from lightspan.collector.native import to_native
from lightspan.errors import InvalidInput


def _ints(values: list[int]) -> bytes:
    return AnyValue(
        array_value=ArrayValue(values=[AnyValue(int_value=v) for v in values])
    ).SerializeToString()


def _element(value: AnyValue) -> bytes:
    """One ArrayValue entry on the wire: tag 0x0A, length, the AnyValue."""
    data = value.SerializeToString()
    return b"\x0a" + bytes([len(data)]) + data


def _array(payload: bytes) -> bytes:
    """An array AnyValue around raw ArrayValue bytes (below 128 B)."""
    return b"\x2a" + bytes([len(payload)]) + payload


token_ids = st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 200_000), max_size=300)
any_ints = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.lists(token_ids, max_size=12))
def test_arrays_of_non_negative_ints_all_take_the_batch_and_read_as_json(arrays):
    raws = [_ints(a) for a in arrays]
    assert int_arrays_json(raws) == [int_array_json(raw) for raw in raws]
    assert all(text is not None for text in int_arrays_json(raws))


@settings(max_examples=200, deadline=None)
@given(st.lists(any_ints | st.lists(st.text(max_size=3), max_size=3) | st.just([1.5]), max_size=8))
def test_any_other_array_is_left_to_the_per_value_path(arrays):
    """Negative ints (ten-byte varints), strings, doubles: None, never a wrong text."""
    raws = [
        _ints(a)
        if a and isinstance(a[0], int)
        else AnyValue(
            array_value=ArrayValue(
                values=[
                    AnyValue(string_value=v) if isinstance(v, str) else AnyValue(double_value=v) for v in a
                ]
            )
        ).SerializeToString()
        for a in arrays
    ]
    for raw, text in zip(raws, int_arrays_json(raws)):
        assert text is None or text == int_array_json(raw)


@pytest.mark.parametrize(
    "payload",
    [
        _element(AnyValue(int_value=1)) + b"\x0a\x00" + _element(AnyValue(int_value=2)),  # an empty element
        _element(AnyValue(int_value=1)) + b"\x0a\x04\x18\x01\x18\x02",  # an element holding two ints
        b"\x0a\x03\x18\x81\x01\x0a",  # the next element cut short
        b"\x0a\x02\x18\x81",  # a varint cut short
        b"\x0a\x04\x18\x01\x0a\x00",  # a length that claims the next element's bytes
        b"\xff" + _element(AnyValue(int_value=1))[1:],  # not an element tag
        b"\x80" + _element(AnyValue(int_value=1)),  # a stray byte before the first element
        _element(AnyValue(int_value=1)) + b"\x80" + _element(AnyValue(int_value=2)),  # and between two
        b"\x0a\x03\x18\x01" + _element(AnyValue(int_value=2)),  # an element length one too long
        b"\x0a\x0b\x18" + b"\xff" * 9 + b"\x01",  # a ten-byte varint: a negative int64
        b"\x0a\x80\x02\x18\x01",  # a two-byte element length (256)
        b"\x0a\x02\x80\x18\x01",  # a stray byte before the int's tag
        b"\x12\x02\x18\x01",  # another field of ArrayValue
    ],
)
def test_odd_bytes_anywhere_send_every_array_to_the_per_value_path(payload):
    good = _ints([7, 8, 9])
    assert int_arrays_json([_array(payload), good]) == [None, None]
    assert int_arrays_json([good, _array(payload), good]) == [None, None, None]


def test_an_element_split_across_two_arrays_is_not_taken_for_one():
    """Checked together, two arrays' bytes run into each other: each must hold whole elements."""
    assert int_arrays_json([_array(b"\x0a\x02"), _array(b"\x18\x05")]) == [None, None]


def test_an_array_over_16_kib_has_a_three_byte_length_and_still_takes_the_batch():
    raw = _ints(list(range(100_000, 105_000)))
    assert raw[3] < 0x80 <= raw[2]  # the length varint takes three bytes
    assert int_arrays_json([raw]) == [int_array_json(raw)] and int_array_json(raw) is not None


def test_overlong_varints_read_as_protobuf_reads_them():
    """A varint may carry extra 0x80 bytes (protobuf accepts them): the number is the same."""
    raw = _array(b"\x0a\x04\x18\x85\x80\x00" + _element(AnyValue(int_value=300)))
    assert int_arrays_json([raw]) == [b"[5,300]"] == [int_array_json(raw)]


def test_empty_arrays_and_headers_that_do_not_add_up():
    empty, ids = _ints([]), _ints([1, 2])
    assert int_arrays_json([empty, ids, empty]) == [b"[]", b"[1,2]", b"[]"]
    assert int_arrays_json([ids + b"\x00", ids[:-1]]) == [None, None]  # a length that is not the value's
    assert int_arrays_json([]) == []


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (numbers below 16), written by hand so that any bytes fit."""
    length, size = b"", len(data)
    while size >= 0x80:
        length += bytes([size & 0x7F | 0x80])
        size >>= 7
    return bytes([number << 3 | 2]) + length + bytes([size]) + data


def _request(raws: list[bytes]) -> bytes:
    """One span per value, each with a string before it and an event holding it too; the first
    value in the resource as well. Values go in as raw bytes: malformed ones included."""

    def attribute(raw: bytes) -> bytes:
        return _field(1, b"v") + _field(2, raw)

    spans = []
    for i, raw in enumerate(raws):
        span = Span(
            trace_id=bytes([i + 1] * 16),
            span_id=bytes([i + 1] * 8),
            name="chat",
            attributes=[KeyValue(key="s", value=AnyValue(string_value="x"))],
        ).SerializeToString()
        spans.append(
            span + _field(9, attribute(raw)) + _field(11, _field(2, b"e") + _field(3, attribute(raw)))
        )
    resource = _field(1, attribute(raws[0])) if raws else b""
    scopes = [_field(2, b"".join(_field(2, span) for span in spans[s::2])) for s in range(2)]
    return _field(1, _field(1, resource) + b"".join(scopes))


values = st.one_of(
    token_ids.map(_ints),
    any_ints.map(_ints),
    st.lists(st.text(max_size=4), max_size=3).map(
        lambda a: AnyValue(
            array_value=ArrayValue(values=[AnyValue(string_value=v) for v in a])
        ).SerializeToString()
    ),
    st.integers().map(lambda i: AnyValue(int_value=i % 2**63).SerializeToString()),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(values, min_size=1, max_size=10))
def test_blocks_are_those_of_the_per_value_path(raws):
    """The request's block is byte for byte the one decoding each array on its own gives."""
    body = _request(raws)
    batched = to_native(parse_protobuf(body))
    original = native.int_arrays_json
    native.int_arrays_json = lambda raws: [None] * len(raws)
    try:
        one_by_one = to_native(parse_protobuf(body))
    finally:
        native.int_arrays_json = original
    assert batched == one_by_one and batched.spans == len(raws)


def test_a_malformed_array_among_token_ids_is_invalid_input():
    body = _request([_ints(list(range(100))), b"\x2a\x05\x0a\x02\x18", _ints([1, 2])])
    with pytest.raises(InvalidInput):
        to_native(parse_protobuf(body))
