"""Captured requests to JSON lines: chained digests, keyed ids, the records (pure: no lmdeploy).

``BlockIdEncoder.encode(data, records)`` turns a batch of requests into their lines.  ``data`` is
each request's prompt full-block token ids followed by the token ids of its kept output blocks
(``record.kept_output_blocks``: the full blocks past the prompt's whose KV it computed), requests
laid end to end, encoded as ``digest.encode_tokens`` does; each record is ``(arrival_s,
input_length, output_length, full_tokens, output_tokens, root, session, chain)``: ``full_tokens``
then ``output_tokens`` of ``data`` belong to it (both multiples of the block size), ``root`` is
``(chain root, seed, the root's 16 little-endian bytes)`` of its namespace and cache salt (None
when it has no such block), ``session`` the engine session it continued (None for a first turn;
keyed here), ``chain`` the host tier's digest chain of the request or None.

A request's blocks are one chain: its prompt's full blocks, then its kept output blocks (the chain
continues through the generated tokens, so an output block gets the digest, and id, the next turn's
prompt gets for the same block when it re-sends the reply).  The first ``full_tokens // block_size``
ids are the record's ``hash_ids``, the rest its ``output_hash_ids``.  A block's digest
(``tier/digest.py``'s chain: ``block_digest`` from the request's salted root) is taken, in this
order, from the newest remembered request this one continues (same first block, the remembered
bytes' xxh3 equal: its prompt and kept output blocks, or else its prompt's alone; up to
``RECENT_PER_BLOCK`` requests remembered per first block, under at most ``RECENT_PROMPTS`` first
blocks), from the host tier's chain of the request (only where it holds at least
``chain_min_blocks`` of the blocks still to digest, its parent digest is the one computed here, its
seed is the request's and its block bytes equal the request's), else computed.  Each line is
``record.capture_line``'s (formatted here, field for field the same: tests compare), the ids from
``CaptureKey.block_ids_text``.

Used on the scheduler's thread by ``integration/trace_capture.py`` and in the capture's helper
process (``encoder_process.py``, which gets no chains).  Invariants: a batch whose ``data`` does
not hold exactly the records' full and kept output tokens raises ValueError and nothing of it is
returned; the remembered requests live in process memory only (digests, ids and xxh3s of tokens;
never written).  Counters: ``blocks_hashed`` and ``blocks_reused`` (chain steps run and skipped:
each full prompt block and kept output block is hashed at most once per request),
``blocks_from_chain`` (of the skipped ones, taken from the host tier's chain).
"""
from __future__ import annotations

from xxhash import xxh3_128_intdigest as _xxh3_128

from ..tier.digest import TOKEN_DTYPE
from .keys import CaptureKey
from .record import _FAST_MS, json_string, timestamp_text

RECENT_PROMPTS = 128    # first blocks under which prompts are remembered for a later one that continues one
RECENT_PER_BLOCK = 4    # ... and prompts remembered per first block (conversations sharing a system prompt)
# the host tier's chain of a request is read only where it holds at least this many of the blocks still to
# digest: reading its objects (cold by then) costs more than hashing a few blocks from the batch's bytes
CHAIN_MIN_BLOCKS = 8

_ITEM = TOKEN_DTYPE.itemsize     # bytes per token id in a digest's block bytes


class BlockIdEncoder:
    """The lines of captured requests under one key and block size; see the module docstring."""

    def __init__(self, key: CaptureKey, block_size: int) -> None:
        self.key = key
        self.block_size = int(block_size)
        # first block's digest -> [(bytes, xxh3 of its tokens, blocks, last digest, ids' text, prompt part), ...]
        # of the latest requests with that first block (at most RECENT_PER_BLOCK, newest last): each covers the
        # request's prompt and kept output blocks; ``prompt part`` is the same 6-tuple for its prompt's blocks
        # alone (its own prompt part None), or None, for a later request that continues the prompt, not the reply
        self._recent: dict[int, list] = {}
        # the constant part of every line after the ids (capture_line's layout)
        self._after_ids = f'],"block_size":{self.block_size},"capture":{json_string(key.fingerprint)}'
        self.chain_min_blocks = CHAIN_MIN_BLOCKS
        self.blocks_hashed = 0
        self.blocks_reused = 0
        self.blocks_from_chain = 0

    def counters(self) -> dict:
        return {"blocks_hashed": self.blocks_hashed, "blocks_reused": self.blocks_reused,
                "blocks_from_chain": self.blocks_from_chain, "ids_keyed": self.key.derived}

    def encode(self, data: bytes, records) -> list[str]:
        """The JSON lines of ``records`` (see the module docstring)."""
        view = memoryview(data)     # slices without copies, for the xxh3 checks
        bs = self.block_size
        step = bs * _ITEM
        key, recent = self.key, self._recent
        ids_text = key.block_ids_text
        chain_min = self.chain_min_blocks if self.chain_min_blocks > 0 else 1
        after_ids = self._after_ids
        lines = []
        append = lines.append
        offset = total = hashed = from_chain = 0
        for arrival, prompt_len, output_len, full, out, root, session, chain in records:
            if root is None:
                text = otext = ""
            else:
                parent, seed, root_bytes = root
                pend = offset + full * _ITEM        # the prompt's full blocks end here, its kept output blocks at end
                end = pend + out * _ITEM
                pblocks = full // bs
                blocks = pblocks + out // bs
                total += blocks
                first = _xxh3_128(root_bytes + data[offset:offset + step], seed)
                hashed += 1
                # the remembered requests with this first block, newest last: the newest one this request
                # continues (its prompt and kept output blocks, else its prompt's alone) gives its digests and ids
                kept = recent.get(first)
                seen = None
                if kept is not None:
                    size = end - offset
                    for at in range(len(kept) - 1, -1, -1):
                        prior = kept[at]
                        if prior[0] <= size and _xxh3_128(view[offset:offset + prior[0]]) == prior[1]:
                            seen = prior
                        else:
                            prior = prior[5]
                            if prior is not None and prior[0] <= size and \
                                    _xxh3_128(view[offset:offset + prior[0]]) == prior[1]:
                                seen = prior
                        if seen is not None:
                            del kept[at]     # this request takes its place: it holds that prompt and more
                            break
                if seen is not None:
                    j, parent, text = seen[2], seen[3], seen[4]   # this request continues that one
                    new = []
                else:
                    j, parent, new, text = 1, first, [first], ""
                # the host tier's chain covers blocks [cs, ce) of this request: digests ds, token bytes bb; its
                # objects are not read where fewer than chain_min blocks are left to digest (ce <= blocks)
                if chain is not None and blocks - j >= chain_min:
                    h = chain.hasher
                    ds = h.digests
                    cs = chain.start_block
                    ce = cs + len(ds)
                    if ce > blocks:
                        ce = blocks
                    if ce - (j if j > cs else cs) >= chain_min and h.namespace.seed == seed:
                        if j < cs:   # up to the chain's first block
                            for at in range(offset + j * step, offset + cs * step, step):
                                parent = _xxh3_128(parent.to_bytes(16, "little") + data[at:at + step], seed)
                                new.append(parent)
                            hashed += cs - j
                            j = cs
                        if (parent == (ds[j - cs - 1] if j > cs else h.parent)
                                and b"".join(h.block_bytes[j - cs:ce - cs])
                                == data[offset + j * step:offset + ce * step]):
                            new += ds[j - cs:ce - cs]
                            parent = new[-1]
                            from_chain += ce - j
                            j = ce
                if j < blocks:
                    for at in range(offset + j * step, end, step):
                        parent = _xxh3_128(parent.to_bytes(16, "little") + data[at:at + step], seed)
                        new.append(parent)
                    hashed += blocks - j
                # ids: the remembered request's (``text``: its first ``known`` blocks), then ``new``'s
                known = blocks - len(new)
                if known <= pblocks:
                    cut = pblocks - known         # of ``new``, the prompt's
                    if cut:
                        more = ids_text(new[:cut] if cut < len(new) else new)
                        text = f"{text},{more}" if text else more
                    otext = ids_text(new[cut:]) if cut < len(new) else ""
                    whole = f"{text},{otext}" if otext and text else (text or otext)
                else:   # the remembered request's ids run past this prompt (into its output blocks)
                    parts = text.split(",")
                    whole = text
                    text = ",".join(parts[:pblocks])
                    otext = ",".join(parts[pblocks:])
                    if new:
                        more = ids_text(new)
                        otext = f"{otext},{more}"
                        whole = f"{whole},{more}"
                if not out or not pblocks:
                    prompt_part = None
                elif known <= pblocks:
                    # its prompt's part too, for a later request that continues the prompt and not the output
                    # (the same prompt sent again): the chain's digest at the prompt's end and its ids
                    prompt_part = (pend - offset, _xxh3_128(view[offset:pend]), pblocks,
                                   new[pblocks - known - 1] if pblocks > known else seen[3], text, None)
                else:   # (its prompt ends inside the remembered request's blocks: that one's prompt part, if shorter)
                    prompt_part = seen[5] if seen[5] is not None and seen[5][2] <= pblocks else None
                prior = (end - offset, _xxh3_128(view[offset:end]), blocks, parent, whole, prompt_part)
                if kept is None:
                    if len(recent) >= RECENT_PROMPTS:
                        recent.clear()
                    recent[first] = [prior]
                else:
                    if len(kept) >= RECENT_PER_BLOCK:
                        del kept[0]
                    kept.append(prior)
                offset = end
            ms = arrival * 1000.0
            if -_FAST_MS < ms < _FAST_MS:   # timestamp_text's fast form, inlined
                stamp = "%.3f" % ms
                if stamp[-1] == "0":
                    stamp = stamp.rstrip("0")
                    if stamp[-1] == ".":
                        stamp += "0"
            else:
                stamp = timestamp_text(arrival)
            append(f'{{"timestamp":{stamp},"input_length":{prompt_len},"output_length":{output_len},'
                   f'"hash_ids":[{text}],"output_hash_ids":[{otext}{after_ids}}}\n' if session is None else
                   f'{{"timestamp":{stamp},"input_length":{prompt_len},"output_length":{output_len},'
                   f'"hash_ids":[{text}],"output_hash_ids":[{otext}{after_ids},'
                   f'"session":{json_string(key.session_id(session))}}}\n')
        if offset != len(data):     # nothing written: some sequence held fewer ids than its blocks
            raise ValueError(f"capture batch: {len(data)} token bytes for {offset} bytes of full prompt "
                             "and kept output blocks")
        self.blocks_hashed += hashed
        self.blocks_from_chain += from_chain
        self.blocks_reused += total - hashed
        return lines
