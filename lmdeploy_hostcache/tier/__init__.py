"""The host tier's core: pure bookkeeping, no LMDeploy, no torch, no KV bytes.

* ``digest``         -- ``Namespace`` and chained, process-stable block digests (``ChainHasher``);
* ``slot_allocator`` -- ``SlotAllocator``: which host slots are free, used and pinned;
* ``eviction``       -- ``EvictionPolicy`` and the policies (``POLICIES``, ``DEFAULT_POLICY``);
  Belady for evaluation only (``OFFLINE_ONLY``);
* ``host_index``     -- ``HostIndex``: the radix index of host-resident blocks by digest, their
  states and the verbs the connector calls (docs/architecture.md);
* ``metrics``        -- ``HostTierMetrics`` / ``L3TierMetrics``: the tier's counters.

Everything that moves bytes lives in ``transfer/``, everything that touches LMDeploy in
``integration/``; the planner, the router and the benches import these modules, never copy them.
"""
