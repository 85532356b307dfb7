"""One captured request as a Mooncake-layout JSON line (the layout ``plan`` reads).

Fields: ``timestamp`` (arrival, ms since the epoch on the capturing node's clock),
``input_length`` and ``output_length`` (tokens), ``hash_ids`` (keyed ids of the prompt's full
blocks, in order; ``keys.py``), ``block_size``, ``capture`` (the key's fingerprint) and, when the
request continued an engine session, ``session`` (keyed).  Invariant: no token id, text, digest or
key is ever a field; ``len(hash_ids) == input_length // block_size``.

The line is formatted directly (no dict, no ``json.dumps`` of the whole record: it runs on LMDeploy's
scheduler thread); it is the same JSON ``json.dumps(..., separators=(",", ":"))`` writes, field for
field (``tests/capture/test_capture.py``).  ``capture_line`` is the same line from the ids' decimal texts
(trace capture keeps those, so an id shared by many requests is formatted once); ``capture_record`` calls it.
"""
from __future__ import annotations

import json
from typing import Sequence

__all__ = ["capture_line", "capture_record", "json_string", "timestamp_text"]


def capture_record(*, arrival_s: float, input_length: int, output_length: int, block_ids: Sequence[int],
                   block_size: int, fingerprint: str, session: str | None = None) -> str:
    """The JSON line (with its newline) of one request."""
    return capture_line(arrival_s, input_length, output_length, ",".join(map(str, map(int, block_ids))),
                        len(block_ids), block_size, fingerprint, session)


def capture_line(arrival_s: float, input_length: int, output_length: int, hash_ids_text: str, num_ids: int,
                 block_size: int, fingerprint: str, session: str | None = None) -> str:
    """``capture_record``'s line from the ids already written out: ``hash_ids_text`` is the ``num_ids`` block
    ids in decimal, comma-separated (trace capture keeps the ids' texts; ``keys.CaptureKey.block_id_texts``)."""
    if block_size <= 0 or input_length < 0 or output_length < 0:
        raise ValueError(f"bad capture record: block_size {block_size}, input {input_length}, output {output_length}")
    if num_ids != input_length // block_size:
        raise ValueError(f"bad capture record: {num_ids} block ids for {input_length} tokens "
                         f"of {block_size}-token blocks")
    tail = "}\n" if session is None else f',"session":{json_string(session)}}}\n'
    return (f'{{"timestamp":{timestamp_text(arrival_s)},"input_length":{int(input_length)},'
            f'"output_length":{int(output_length)},"hash_ids":[{hash_ids_text}],"block_size":{int(block_size)},'
            f'"capture":{json_string(fingerprint)}{tail}')


_INF = float("inf")
_FAST_MS = float(2**41)     # below this many ms (year 2039), doubles are spaced < 0.0005 apart


def timestamp_text(arrival_s: float) -> str:
    """``repr(round(arrival_s * 1000.0, 3))``, the record's timestamp (ValueError for NaN or infinity).

    Below ``_FAST_MS`` it is written as ``'%.3f'`` less its trailing zeros (one kept after the point),
    a third of the time: both round the double's exact value to 3 decimals the same way (correctly
    rounded, ties to even), and where doubles are spaced less than 0.0005 apart no string with fewer
    digits reads back as the same double, so that is what ``repr`` writes (``tests/capture``).
    """
    ms = float(arrival_s) * 1000.0
    if -_FAST_MS < ms < _FAST_MS:     # false for NaN and infinities
        text = "%.3f" % ms
        if text[-1] == "0":
            text = text.rstrip("0")
            if text[-1] == ".":
                text += "0"
        return text
    timestamp = round(ms, 3)
    if timestamp != timestamp or timestamp in (_INF, -_INF):
        raise ValueError(f"bad capture record: arrival {arrival_s}")
    return repr(timestamp)


def json_string(text: str) -> str:
    """A JSON string literal; hex digits (the fingerprint, keyed session ids) need no escaping."""
    text = str(text)
    return f'"{text}"' if text.isascii() and text.isalnum() else json.dumps(text)
