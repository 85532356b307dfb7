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


@pytest.mark.parametrize("change", ["tensor", "config", "remote_code", "small_shard", "new_shard", "rename"])
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
    elif change == "remote_code":   # trust_remote_code: configuration code fills in what config.json omits
        (a / "configuration_m.py").write_text("ROPE_THETA = 1e6")
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
    (``NamespaceFactory.from_cache_config``) after the prepare hook named the model and the executor
    hook named the weights (``record_weights``), as at engine start-up."""
    from types import SimpleNamespace

    from lmdeploy_hostcache.config import HostCacheConfig
    from lmdeploy_hostcache.integration.engine_config import model_identity_from_path
    from lmdeploy_hostcache.integration.l3_tier import record_weights
    from lmdeploy_hostcache.integration.namespace import NamespaceFactory
    from lmdeploy_hostcache.l3.weights import exact_content_name

    hostcache = HostCacheConfig.from_dict({"l3": l3})
    extra = {"model_identity": model_identity_from_path(str(model_path)), "kv_dtype": "bfloat16"}
    content = exact_content_name(extra["model_identity"])   # as the prepare hook names it
    if content:
        extra["model_content_name"] = content
    if hostcache.l3 is not None:
        record_weights(extra, hostcache.l3, None, adapters=adapters)
    cache_config = SimpleNamespace(block_size=64, quant_policy=0, kernel_block_size=64,
                                   kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))
    return NamespaceFactory.from_cache_config(cache_config, hostcache).for_adapter(adapter)


def _hub_snapshot(cache, files: dict[str, bytes], revision="abc123"):
    """A Hugging Face cache layout: ``blobs/<sha256>`` and ``snapshots/<revision>/<name>`` links to them."""
    import hashlib

    repo = cache / "models--org--m"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


MODEL_FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 64}


@pytest.mark.parametrize("l3", [None, {"master_address": "127.0.0.1:1"},
                                {"master_address": "127.0.0.1:1", "weights_id": "commit-abc123"}])
def test_one_hub_snapshot_under_two_homes_is_one_model(tmp_path, l3):
    """Two nodes keep one Hugging Face snapshot under different homes: its files are links named by their
    content hashes, so both nodes name the model by those (exact, whatever the path) and compute the same
    digests and store keys; a snapshot whose weights differ in one byte is another model."""
    a = _hub_snapshot(tmp_path / "root" / ".cache", MODEL_FILES)
    b = _hub_snapshot(tmp_path / "svc" / ".cache", MODEL_FILES)
    ns_a, ns_b = _engine_namespace(a, l3), _engine_namespace(b, l3)
    assert ns_a == ns_b and str(a) not in ns_a.model
    assert StoreKeyspace(ns_a, weights="w").key(7) == StoreKeyspace(ns_b, weights="w").key(7)
    named = bool(l3 and l3.get("weights_id"))
    assert ("exact:" in ns_a.model) != named               # weights_id names the weights, snapshot or not
    for i, changed in enumerate((
            {"model.safetensors": MODEL_FILES["model.safetensors"][:-1] + b"x"},   # one byte of the weights
            {"configuration_m.py": b"ROPE_THETA = 1e6"})):                          # remote configuration code
        other = _hub_snapshot(tmp_path / f"ops{i}" / ".cache", dict(MODEL_FILES, **changed))
        assert (_engine_namespace(other, l3) != ns_a) != (named and i == 0)   # weights_id trusts the operator
    if named:   # a plain copy of the same weights under the same weights_id shares with the snapshot
        plain = tmp_path / "plain"
        plain.mkdir()
        for name, data in MODEL_FILES.items():
            (plain / name).write_bytes(data)
        assert _engine_namespace(plain, l3) == ns_a


def test_plain_folders_at_two_paths_stay_two_models_unless_an_operator_names_them(tmp_path):
    """A plain copy is not named exactly (the fingerprint samples the weights, so a fine-tune of a few small
    tensors could pass it): it keeps its path, alone or with the store tier; with l3.weights_id the operator
    names the weights and both nodes share, but a different model (another configuration) given the same id
    stays apart."""
    a = _checkpoint(tmp_path / "root" / "m")
    b = tmp_path / "svc" / "m"
    shutil.copytree(a, b)
    store = {"master_address": "127.0.0.1:1"}
    for l3 in (None, store):
        assert _engine_namespace(a, l3).model == os.path.realpath(a) != _engine_namespace(b, l3).model
    named = dict(store, weights_id="commit-abc123")
    ns_a, ns_b = _engine_namespace(a, named), _engine_namespace(b, named)
    assert ns_a == ns_b and ns_a.model.startswith("weights:id:commit-abc123/cf:")
    (b / "config.json").write_text('{"model_type": "llama", "hidden_size": 128}')
    assert _engine_namespace(b, named) != ns_a
    assert _engine_namespace(tmp_path / "no-such-dir", None).model == str(tmp_path / "no-such-dir")   # a hub id


def test_what_is_not_named_exactly(tmp_path):
    """exact_content_name: links into a folder other than blobs/, a plain weight file beside links, links whose
    names are not content hashes, and a snapshot without config.json or without weights all give None."""
    from lmdeploy_hostcache.l3.weights import exact_content_name

    snap = _hub_snapshot(tmp_path / "c", MODEL_FILES)
    assert exact_content_name(str(snap))
    (snap / "extra.safetensors").write_bytes(b"plain")
    assert exact_content_name(str(snap)) is None
    other = tmp_path / "o"
    other.mkdir()
    (other / "store").mkdir()
    for name, data in MODEL_FILES.items():
        (other / "store" / ("a" * 64 if name == "config.json" else "b" * 64)).write_bytes(data)
        (other / name).symlink_to(other / "store" / ("a" * 64 if name == "config.json" else "b" * 64))
    assert exact_content_name(str(other)) is None                   # not blobs/
    for name in ("model-v2.safetensors", "c" * 63):                  # in blobs/, but not a content hash
        odd = _hub_snapshot(tmp_path / f"x{len(name)}", MODEL_FILES)
        blob = odd.parent.parent / "blobs" / name
        blob.write_bytes(MODEL_FILES["model.safetensors"])
        (odd / "model.safetensors").unlink()
        (odd / "model.safetensors").symlink_to(blob)
        assert exact_content_name(str(odd)) is None
    edited = _hub_snapshot(tmp_path / "e", MODEL_FILES)              # config.json edited through its link
    before = exact_content_name(str(edited))
    (edited / "config.json").write_text('{"model_type": "llama", "rope_scaling": {"type": "yarn"}}')
    assert (edited / "config.json").is_symlink() and exact_content_name(str(edited)) not in (None, before)
    assert exact_content_name(str(_hub_snapshot(tmp_path / "n", {"model.safetensors": b"w"}))) is None
    assert exact_content_name(str(_hub_snapshot(tmp_path / "w", {"config.json": b"{}"}))) is None


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
