"""Int-array attribute values (token ids) of a whole request, written as JSON in one numpy pass.

An LLM span carries its prompt's and completion's token ids as arrays of ints, stored as JSON
text (`[1,2,3]`, the ClickHouse exporter's convention). Decoded one array at a time (an upb parse,
a Python int per number, orjson) they were a third of the collector's decoding time. Here every
int array of one request is checked and decoded together, in numpy, and each array's JSON is
written by orjson straight from its numpy slice.

The wire bytes of such an AnyValue: tag 0x2A, a varint length, then per element an ArrayValue
entry `0A L 18 <varint>`: tag, length, AnyValue's int_value tag, the number. In the elements'
bytes exactly four are below 0x80 (the tag, the length, 0x18 and the varint's last byte), so the
positions of those bytes, four by four, describe every element, and their gaps and values check
the layout. Anything else (another element type, an empty element, a negative number, which
takes a ten-byte varint, a length that does not add up) is left to the caller's generic path,
which decodes it exactly or reports it as malformed.
"""

from __future__ import annotations

import numpy as np
import orjson

from lightspan.collector.decode import array_payload

_LONGEST_VARINT = 9  # bytes: 63 bits, every int64 >= 0
_JSON_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _elements(data: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The numbers of back-to-back int elements and where each element ends, or None where the
    bytes are anything else."""
    low = np.flatnonzero(data < 0x80)
    if len(low) % 4 or (len(low) and low[0] != 0):
        return None
    marks = data[low].reshape(-1, 4)  # per element: 0x0A, L, 0x18, the varint's last byte
    gaps = np.diff(low, append=len(data)).reshape(-1, 4)  # 1, 1, varint length, 1 (to the next element)
    lengths = gaps[:, 2]
    if not (
        (marks[:, 0] == 0x0A).all()
        and (marks[:, 2] == 0x18).all()
        and (gaps[:, 0] == 1).all()
        and (gaps[:, 1] == 1).all()
        and (gaps[:, 3] == 1).all()
        and (marks[:, 1] == lengths + 1).all()
        and (lengths <= _LONGEST_VARINT).all()
    ):
        return None
    # A varint is little-endian groups of 7 bits: start from its last byte, shift in the earlier ones.
    last = low[3::4]
    numbers = marks[:, 3].astype(np.uint64)
    seven = np.uint64(7)
    for back in range(1, int(lengths.max(initial=1))):
        earlier = (data[last - back] & 0x7F).astype(np.uint64)
        numbers = np.where(lengths > back, (numbers << seven) | earlier, numbers)
    return numbers, last + 1


def int_arrays_json(raws: list[bytes]) -> list[bytes | None]:
    """Each AnyValue (wire bytes) that is exactly an array of ints in [0, 2**63) as its JSON list
    (UTF-8), in order; None for any other value, and for all of them when one of them is malformed
    inside (the caller's per-value path then decodes or rejects each exactly)."""
    payloads = [array_payload(raw) for raw in raws]
    taken = [p for p in payloads if p is not None]
    data = np.frombuffer(b"".join(taken), np.uint8)
    elements = _elements(data)
    if elements is None:
        return [None] * len(raws)
    numbers, element_ends = elements
    # Each array must end where an element ends (or hold none); its numbers are the elements up to there.
    array_ends = np.cumsum(np.fromiter(map(len, taken), np.int64, len(taken)))
    counts = np.searchsorted(element_ends, array_ends, side="right")
    if not (np.concatenate(([0], element_ends))[counts] == array_ends).all():
        return [None] * len(raws)
    texts: list[bytes | None] = []
    start = 0
    counts_iter = iter(counts.tolist())
    for payload in payloads:
        if payload is None:
            texts.append(None)
            continue
        end = next(counts_iter)
        texts.append(orjson.dumps(numbers[start:end], option=_JSON_NUMPY))
        start = end
    return texts
