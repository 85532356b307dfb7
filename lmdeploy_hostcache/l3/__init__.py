"""Shared third tier: a Mooncake Store under the host tier (pure logic, no LMDeploy import).

* ``keys``: store keys from our namespace + TP layout + weights + chained digest (never LMDeploy's scheme);
* ``weights``: a fingerprint of a checkpoint's files, naming the weights in every key;
* ``objects``: the self-describing, checksummed object format of one block;
* ``client``: batched exists/put/get with deadlines over a store backend;
* ``config``: the ``l3:`` section of the settings file, validated field by field;
* ``backend``: open the Mooncake client (``connect``: start-up error naming the address, or a
  warning with ``on_unreachable: warn``);
* ``chain``: the host -> store chain for the connector (write-backs, lookups over every TP
  rank's key, all-or-nothing staging into host slots);
* ``master``: start/stop a real ``mooncake_master`` on loopback (tests and ``bench transfer``).

Every failure of the store surfaces as an ``L3Error`` subclass; callers turn it into a recompute.
"""
from .errors import L3Corrupt, L3Error, L3Full, L3Missing, L3Timeout, L3Unavailable

__all__ = ["L3Corrupt", "L3Error", "L3Full", "L3Missing", "L3Timeout", "L3Unavailable"]
