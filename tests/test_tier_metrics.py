"""The tier's counters (``tier.metrics``): they only grow, and a bad call changes nothing."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.tier.metrics import HostTierMetrics, L3TierMetrics


@pytest.mark.parametrize("cls", [HostTierMetrics, L3TierMetrics])
def test_a_bad_add_is_refused_whole(cls):
    m = cls()
    name = next(iter(m.snapshot()))
    m.add(**{name: 3})
    before = m.snapshot()
    with pytest.raises(ValueError, match="counters only grow"):
        m.add(**{name: 1}, **{n: -1 for n in list(before)[1:2]})
    with pytest.raises(AttributeError, match="has no counter 'nope'"):
        m.add(**{name: 1}, nope=1)
    assert m.snapshot() == before, "a refused call must not change any counter"
