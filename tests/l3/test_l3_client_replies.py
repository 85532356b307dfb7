"""A store whose answers have the wrong shape (None, an int, a string, a short list, an object that is not
bytes) is a store failure, ``L3Unavailable``, never a ``TypeError`` out of the client: the chains catch
``L3Error`` and the turn recomputes.  No Mooncake needed: the backend is a plain object."""
from __future__ import annotations

import pytest

from lmdeploy_hostcache.l3 import L3Unavailable
from lmdeploy_hostcache.l3.client import L3Client


class Backend:
    def __init__(self, exists=None, blobs=None, put_codes=None):
        self._exists, self._blobs, self._put = exists, blobs, put_codes

    def batch_is_exist(self, keys):
        return self._exists

    def get_batch(self, keys):
        return self._blobs

    def put(self, key, value):
        return self._put

    def close(self):
        pass


@pytest.mark.parametrize("op, reply", [
    *[("exists", r) for r in (None, -1, "11", [1], [1, 1, 1], [1, "1"], [1, None])],
    *[("get", r) for r in (None, 3, "ab", [b"x"], [b"x", 5], [b"x", "text"])],
])
def test_replies_of_the_wrong_shape_are_store_failures(op, reply):
    client = L3Client(Backend(**{"exists" if op == "exists" else "blobs": reply}), timeout_s=2.0)
    try:
        with pytest.raises(L3Unavailable, match=f"{op}: store answered"):
            getattr(client, op)(["a", "b"])
    finally:
        client.close()


def test_well_formed_replies_still_pass():
    client = L3Client(Backend(exists=[1, 0], blobs=[b"x", b""], put_codes=0), timeout_s=2.0)
    try:
        assert client.exists(["a", "b"]) == [True, False]
        assert client.get(["a", "b"]) == [b"x", None]
        assert client.put([("a", b"x")]) == [True]
    finally:
        client.close()
