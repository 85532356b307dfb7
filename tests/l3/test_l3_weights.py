"""The weights fingerprint in every store key (l3/weights.py) and what a weight update stops."""
from __future__ import annotations

import os
import shutil

import pytest

from lmdeploy_hostcache.l3.keys import StoreKeyspace
from lmdeploy_hostcache.l3.weights import PIECE_BYTES, SAMPLES, checkpoint_fingerprint
from lmdeploy_hostcache.tier.digest import Namespace

BIG = 2 * SAMPLES * PIECE_BYTES   # sampled, not read whole


def _checkpoint(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (root / "model-00001-of-00002.safetensors").write_bytes((bytes(range(251)) * (BIG // 251 + 1))[:BIG])
    (root / "model-00002-of-00002.safetensors").write_bytes(bytes(1000))
    (root / "README.md").write_text("not weights")
    return root


def test_the_same_bytes_give_the_same_fingerprint_anywhere(tmp_path):
    a = _checkpoint(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    os.utime(b / "model-00001-of-00002.safetensors", (1, 1))   # another copy time
    (b / "README.md").write_text("edited")                    # not a weight file
    (b / ".cache").mkdir()
    (b / ".cache" / "x.bin").write_bytes(b"hidden folder")    # hidden folders are skipped
    assert checkpoint_fingerprint(str(a)) == checkpoint_fingerprint(str(b))
    assert len(checkpoint_fingerprint(str(a))) == 32


@pytest.mark.parametrize("change", ["tensor", "config", "small_shard", "new_shard", "rename"])
def test_other_weights_give_another_fingerprint(tmp_path, change):
    a = _checkpoint(tmp_path / "a")
    before = checkpoint_fingerprint(str(a))
    shard = a / "model-00001-of-00002.safetensors"
    if change == "tensor":      # one whole tensor of 1 MiB rewritten, as a merged adapter does
        data = bytearray(shard.read_bytes())
        data[BIG // 3:BIG // 3 + (1 << 20)] = bytes(1 << 20)
        shard.write_bytes(data)
    elif change == "config":
        (a / "config.json").write_text('{"model_type": "llama", "hidden_size": 65}')
    elif change == "small_shard":   # read whole: one byte anywhere counts
        (a / "model-00002-of-00002.safetensors").write_bytes(bytes(999) + b"\x01")
    elif change == "new_shard":
        (a / "extra.bin").write_bytes(b"more weights")
    else:
        shard.rename(a / "renamed.safetensors")
    assert checkpoint_fingerprint(str(a)) != before


def test_a_single_file_a_missing_path_and_an_unreadable_file(tmp_path):
    a = _checkpoint(tmp_path / "a")
    shard = a / "model-00002-of-00002.safetensors"
    assert len(checkpoint_fingerprint(str(shard))) == 32
    assert checkpoint_fingerprint(str(tmp_path / "no-such")) is None
    assert checkpoint_fingerprint("org/model-on-the-hub") is None
    shard.unlink()
    shard.symlink_to(tmp_path / "gone")          # a shard that cannot be opened (even by root)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: cannot read it"):
        checkpoint_fingerprint(str(a))


def test_weights_key_the_store_space():
    ns = Namespace(model="/models/m", block_size=64, kv_format="native/kb64")
    keys = {StoreKeyspace(ns, weights=w).key(7) for w in ("", "fp:" + "a" * 32, "fp:" + "b" * 32, "id:run-1")}
    assert len(keys) == 4
    assert StoreKeyspace(ns, weights="id:run-1").key(7) == StoreKeyspace(ns, weights="id:run-1").key(7)


def test_a_stopped_chain_never_reads_or_writes_the_store():
    from types import SimpleNamespace

    from lmdeploy_hostcache.l3.chain import SchedulerChain
    from lmdeploy_hostcache.tier.host_index import HostIndex

    asked = []

    class Store:
        metrics = None

        def exists(self, keys):
            asked.append(keys)
            return [True] * len(keys)

    index = HostIndex(4, policy="lru")
    ns = Namespace(model="m", block_size=4, kv_format="native/kb64")
    chain = SchedulerChain(index, Store(), [StoreKeyspace(ns)])
    assert chain.lookup([1, 2], None) == 2 and len(asked) == 1
    chain.on_host_evict(SimpleNamespace(digest=1, tokens=b"t", slot=0))
    chain.stop("weights updated in place (update_params)")
    assert chain.take_write_backs() == [], "queued write-backs of the old weights are dropped"
    chain.on_host_evict(SimpleNamespace(digest=2, tokens=b"t", slot=1))
    assert chain.take_write_backs() == []
    assert chain.lookup([1, 2], None) == 0 and len(asked) == 1, "no store read after the stop"
    assert chain.reserve([1], [ns.root], [b"t"]) is None and len(index) == 0


def _engine_namespace(model_path, l3, adapters=None, adapter=None):
    """The namespace (of ``adapter``; None: the base model) a node's connector builds
    (``NamespaceFactory.from_cache_config``) after the executor hook named the weights
    (``record_weights``), as at engine start-up."""
    from types import SimpleNamespace

    from lmdeploy_hostcache.config import HostCacheConfig
    from lmdeploy_hostcache.integration.engine_config import model_identity_from_path
    from lmdeploy_hostcache.integration.l3_tier import record_weights
    from lmdeploy_hostcache.integration.namespace import NamespaceFactory

    hostcache = HostCacheConfig.from_dict({"l3": l3})
    extra = {"model_identity": model_identity_from_path(str(model_path)), "kv_dtype": "bfloat16"}
    if hostcache.l3 is not None:
        record_weights(extra, hostcache.l3, None, adapters=adapters)
    cache_config = SimpleNamespace(block_size=64, quant_policy=0, kernel_block_size=64,
                                   kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))
    return NamespaceFactory.from_cache_config(cache_config, hostcache).for_adapter(adapter)


@pytest.mark.parametrize("weights_id", ["", "commit-abc123"])
def test_the_same_weights_under_two_paths_share_the_store(tmp_path, weights_id):
    """Two nodes keep one checkpoint under different homes' hub caches: with the store tier on, the
    weights name (fingerprint or weights_id), not the path, is the namespace's model, so both nodes
    compute the same digests and store keys; other weights still get another namespace."""
    snapshot = ".cache/huggingface/hub/models--org--m/snapshots/abc123"
    a = _checkpoint(tmp_path / "root" / snapshot)
    b = tmp_path / "svc" / snapshot
    shutil.copytree(a, b)
    l3 = {"master_address": "127.0.0.1:1", "weights_id": weights_id}
    ns_a, ns_b = _engine_namespace(a, l3), _engine_namespace(b, l3)
    assert ns_a == ns_b and ns_a.model.startswith("weights:")
    assert StoreKeyspace(ns_a, weights="w").key(7) == StoreKeyspace(ns_b, weights="w").key(7)
    if not weights_id:   # other weights: another namespace
        (b / "model-00002-of-00002.safetensors").write_bytes(bytes([1]) * 1000)
        assert _engine_namespace(b, l3) != ns_a
    # another model (its configuration differs) keeps its own namespace even when an operator gives both
    # one weights_id
    (b / "config.json").write_text('{"model_type": "llama", "hidden_size": 128}')
    assert _engine_namespace(b, l3) != ns_a
    # without the store tier the configuration names the model (no KV leaves the process; the feed and
    # merged captures only need both nodes to agree): the same across paths, another for another config
    (b / "config.json").write_text((a / "config.json").read_text())
    plain_a, plain_b = _engine_namespace(a, None), _engine_namespace(b, None)
    assert plain_a == plain_b and plain_a.model.startswith("config:")
    (b / "config.json").write_text('{"model_type": "llama", "hidden_size": 128}')
    assert _engine_namespace(b, None) != plain_a
    assert _engine_namespace(tmp_path / "no-such-dir", None).model == str(tmp_path / "no-such-dir")   # a hub id


def test_a_hub_id_with_a_weights_id_keeps_the_hub_id_in_the_namespace():
    """A model path not on the machine (a hub id) has no configuration to fingerprint: with weights_id the
    hub id stays the namespace's model, so one id given to two hub models does not join them."""
    l3 = {"master_address": "127.0.0.1:1", "weights_id": "run-1"}
    a, b = _engine_namespace("org/model-a", l3), _engine_namespace("org/model-b", l3)
    assert (a.model, b.model) == ("org/model-a", "org/model-b")


def test_nodes_loading_other_adapter_sets_share_the_base_model_and_each_adapter(tmp_path):
    """An adapter's fingerprint keys that adapter's namespace only: nodes with no adapter, adapter x, or
    adapters x and y share base-model blocks and x's blocks; x retrained under the same name does not."""
    base = _checkpoint(tmp_path / "base")
    x, y = tmp_path / "x", tmp_path / "y"
    for folder, r in ((x, 8), (y, 16)):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(f'{{"r": {r}}}')
        (folder / "adapter_model.safetensors").write_bytes(bytes(range(r)) * 64)
    l3 = {"master_address": "127.0.0.1:1"}
    sets = (None, {"x": str(x)}, {"x": str(x), "y": str(y)})
    assert len({_engine_namespace(base, l3, adapters) for adapters in sets}) == 1
    assert len({_engine_namespace(base, l3, adapters, "x") for adapters in sets[1:]}) == 1
    before = _engine_namespace(base, l3, sets[1], "x")
    assert before != _engine_namespace(base, l3, sets[1])
    (x / "adapter_model.safetensors").write_bytes(bytes(range(8, 0, -1)) * 64)   # retrained, same name
    assert _engine_namespace(base, l3, sets[1], "x") != before
    assert _engine_namespace(base, None, sets[1], "x").adapter == "x"           # no store tier: the name only
