"""One captured request as a Mooncake-layout JSON line (the layout ``plan`` reads).

Fields: ``timestamp`` (arrival, ms since the epoch on the capturing node's clock),
``input_length`` and ``output_length`` (tokens), ``hash_ids`` (keyed ids of the prompt's full
blocks, in order; ``keys.py``), ``output_hash_ids`` (keyed ids of the full blocks past the prompt's
whose KV the request computed while decoding: the blocks LMDeploy's prefix trie can keep at its end,
the same chain continued through the generated tokens; ``kept_output_blocks``), ``block_size``,
``capture`` (the key's fingerprint) and, when the request continued an engine session, ``session``
(keyed).  Invariants: no token id, text, digest or key is ever a field (``output_hash_ids`` are ids
of the same kind as ``hash_ids``); ``len(hash_ids) == input_length // block_size`` and
``len(output_hash_ids) == kept_output_blocks(input_length, output_length, block_size)``.

Which output blocks (LMDeploy 0.18, ``paging/block_trie/trie.py``): ``BlockTrie.allocate`` attaches a
sequence's blocks up to ``num_valid_ids // block_size`` when the scheduler allocates for it (at its
admission and at each growth while decoding); the last token a request generates is never fed back,
so the KV of at most ``input_length + output_length - 1`` tokens exists, and the full blocks past the
prompt's full blocks that the trie can hold are ``(input_length + output_length - 1) // block_size -
input_length // block_size`` (none without output).  How many of them a request actually left in the
trie depends on when it last grew (the step model decides that, ``planner/engine_steps.py``); the
capture names them all.

The line is formatted directly (no dict, no ``json.dumps`` of the whole record: it runs on LMDeploy's
scheduler thread); it is the same JSON ``json.dumps(..., separators=(",", ":"))`` writes, field for
field (``tests/capture/test_capture.py``).  ``capture_line`` is the same line from the ids' decimal texts
(trace capture keeps those, so an id shared by many requests is formatted once); ``capture_record`` calls it.
"""
from __future__ import annotations

import json
from typing import Sequence

__all__ = ["capture_line", "capture_record", "json_string", "kept_output_blocks", "kept_tokens", "timestamp_text"]


def kept_output_blocks(input_length: int, output_length: int, block_size: int) -> int:
    """Full blocks past the prompt's full blocks whose KV a request of these lengths computed (the last
    generated token's KV never is): the most of its output blocks LMDeploy's trie can keep at its end."""
    if output_length <= 0:
        return 0
    return (input_length + output_length - 1) // block_size - input_length // block_size


def kept_tokens(input_length: int, output_length: int, block_size: int) -> int:
    """The tokens of the prompt's full blocks and of its ``kept_output_blocks``, a multiple of the block
    size: what a record's ids are computed over."""
    return (input_length // block_size + kept_output_blocks(input_length, output_length, block_size)) * block_size


def capture_record(*, arrival_s: float, input_length: int, output_length: int, block_ids: Sequence[int],
                   block_size: int, fingerprint: str, session: str | None = None,
                   output_block_ids: Sequence[int] = ()) -> str:
    """The JSON line (with its newline) of one request."""
    return capture_line(arrival_s, input_length, output_length, ",".join(map(str, map(int, block_ids))),
                        len(block_ids), block_size, fingerprint, session,
                        ",".join(map(str, map(int, output_block_ids))), len(output_block_ids))


def capture_line(arrival_s: float, input_length: int, output_length: int, hash_ids_text: str, num_ids: int,
                 block_size: int, fingerprint: str, session: str | None = None, output_ids_text: str = "",
                 num_output_ids: int = 0) -> str:
    """``capture_record``'s line from the ids already written out: ``hash_ids_text`` is the ``num_ids`` block
    ids in decimal, comma-separated (trace capture keeps the ids' texts; ``keys.CaptureKey.block_id_texts``),
    ``output_ids_text`` the ``num_output_ids`` output block ids likewise."""
    if block_size <= 0 or input_length < 0 or output_length < 0:
        raise ValueError(f"bad capture record: block_size {block_size}, input {input_length}, output {output_length}")
    if num_ids != input_length // block_size:
        raise ValueError(f"bad capture record: {num_ids} block ids for {input_length} tokens "
                         f"of {block_size}-token blocks")
    kept = kept_output_blocks(input_length, output_length, block_size)
    if num_output_ids != kept:
        raise ValueError(f"bad capture record: {num_output_ids} output block ids for {input_length} + "
                         f"{output_length} tokens of {block_size}-token blocks ({kept} kept past the prompt's)")
    tail = "}\n" if session is None else f',"session":{json_string(session)}}}\n'
    return (f'{{"timestamp":{timestamp_text(arrival_s)},"input_length":{int(input_length)},'
            f'"output_length":{int(output_length)},"hash_ids":[{hash_ids_text}],'
            f'"output_hash_ids":[{output_ids_text}],"block_size":{int(block_size)},'
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
