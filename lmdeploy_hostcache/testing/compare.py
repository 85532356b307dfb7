"""Token-by-token comparison of generated outputs (reference vs candidate).

Used for "greedy outputs must be equal token for token" (lossless host formats) and for
the "token agreement" figure of lossy host formats; the GPU proof kit reuses it.

Definitions (per request id present in the reference):
- ``first_difference[rid]``: first position where the two token lists differ, or the
  shorter length when one is a strict prefix of the other; absent when they are equal.
  A request missing from the candidate differs at position 0.
- ``matching_tokens``: positions ``i < min(len_ref, len_cand)`` with equal tokens;
  ``total_tokens``: sum over requests of ``max(len_ref, len_cand)``, so a length
  difference counts against agreement. ``agreement = matching_tokens / total_tokens``
  (1.0 when there are no tokens at all).
- ``prefix_agreement``: tokens before the first difference over ``total_tokens`` (a
  greedy continuation after a divergence is conditioned on different text, so this
  is the stricter figure).
Candidate ids absent from the reference are listed in ``extra_requests`` and make the
comparison non-identical. Inputs are never mutated.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["TokenComparison", "compare_token_outputs"]


@dataclass(frozen=True)
class TokenComparison:
    total_requests: int
    total_tokens: int
    matching_tokens: int
    prefix_matching_tokens: int
    mismatching_requests: tuple[str, ...]
    first_difference: dict[str, int] = field(default_factory=dict)
    missing_requests: tuple[str, ...] = ()
    extra_requests: tuple[str, ...] = ()

    @property
    def agreement(self) -> float:
        return self.matching_tokens / self.total_tokens if self.total_tokens else 1.0

    @property
    def prefix_agreement(self) -> float:
        return self.prefix_matching_tokens / self.total_tokens if self.total_tokens else 1.0

    @property
    def identical(self) -> bool:
        return not self.mismatching_requests and not self.extra_requests

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mismatching_requests"] = list(self.mismatching_requests)
        d["missing_requests"] = list(self.missing_requests)
        d["extra_requests"] = list(self.extra_requests)
        d["agreement"] = self.agreement
        d["prefix_agreement"] = self.prefix_agreement
        d["identical"] = self.identical
        return d

    def summary(self) -> str:
        head = (f"{self.total_requests} requests, {self.total_tokens} tokens: "
                f"agreement {self.agreement:.2%} (prefix {self.prefix_agreement:.2%}), "
                f"{len(self.mismatching_requests)} mismatching")
        if self.mismatching_requests:
            shown = ", ".join(f"{r}@{self.first_difference[r]}" for r in self.mismatching_requests[:8])
            head += f" [first differences: {shown}]"
        if self.extra_requests:
            head += f"; {len(self.extra_requests)} extra in candidate"
        return head


def _tokens(name: str, rid: str, seq: Sequence[int]) -> list[int]:
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence | Iterable):
        raise TypeError(f"{name}[{rid!r}] must be a sequence of token ids, not {type(seq).__name__}")
    out = []
    for i, t in enumerate(seq):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name}[{rid!r}][{i}] is {t!r}, not an int token id")
        out.append(int(t))
    return out


def compare_token_outputs(reference: Mapping[str, Sequence[int]],
                          candidate: Mapping[str, Sequence[int]]) -> TokenComparison:
    """Compare two ``{request_id: token_ids}`` mappings (see module docstring)."""
    if not isinstance(reference, Mapping) or not isinstance(candidate, Mapping):
        raise TypeError("reference and candidate must be mappings of request id -> token ids")
    total = matching = prefix = 0
    mismatching: list[str] = []
    missing: list[str] = []
    first: dict[str, int] = {}
    for rid in reference:
        ref = _tokens("reference", rid, reference[rid])
        if rid not in candidate:
            missing.append(rid)
            mismatching.append(rid)
            first[rid] = 0
            total += len(ref)
            continue
        cand = _tokens("candidate", rid, candidate[rid])
        n = min(len(ref), len(cand))
        total += max(len(ref), len(cand))
        same = [ref[i] == cand[i] for i in range(n)]
        matching += sum(same)
        diff = next((i for i, s in enumerate(same) if not s), n)
        prefix += diff
        if diff < n or len(ref) != len(cand):
            mismatching.append(rid)
            first[rid] = diff
    extra = tuple(r for r in candidate if r not in reference)
    return TokenComparison(total_requests=len(reference), total_tokens=total, matching_tokens=matching,
                           prefix_matching_tokens=prefix, mismatching_requests=tuple(mismatching),
                           first_difference=first, missing_requests=tuple(missing), extra_requests=extra)
