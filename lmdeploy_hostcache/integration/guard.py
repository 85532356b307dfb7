"""Version and source-hash guard for the LMDeploy patches.

The extension rebinds a handful of LMDeploy 0.18.0 functions (``activate.py``) and
relies on the exact behaviour of a few more (the callers of those functions and the
eviction method the connector copies). Before anything is patched, ``verify()`` checks

- the installed LMDeploy version equals ``SUPPORTED_LMDEPLOY_VERSION``, and
- for every target in ``PINS``, sha256 of its source equals the pinned digest.

Invariants:
- ``verify()`` never imports LMDeploy: it reads the version from the distribution
  metadata and the sources from the installed files (``ast``), so a refusal leaves
  LMDeploy exactly as stock, and the check costs nothing at interpreter start.
- The source a pin hashes is what ``inspect.getsource`` returns for the live object
  (decorators included, original indentation); ``tests/integration/test_guard.py``
  checks that both ways of reading it agree.
- Pins are computed from the installed 0.18.0 (``python -m
  lmdeploy_hostcache.integration.guard --print-pins``) and committed here.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PINS",
    "PATCHED_TARGETS",
    "RELIED_TARGETS",
    "SUPPORTED_LMDEPLOY_VERSION",
    "GuardResult",
    "installed_lmdeploy_version",
    "lmdeploy_root",
    "source_digest",
    "target_source",
    "verify",
]

SUPPORTED_LMDEPLOY_VERSION = "0.18.0"

# Targets are "dotted.module:Qualified.name". A class target pins the whole class body
# (used where the patched callable has no source of its own, e.g. a dataclass __init__).
PATCHED_TARGETS: dict[str, str] = {
    # target -> why it is rebound (see activate.py)
    "lmdeploy.pytorch.kv_connector.factory:build_kv_connector":
        "route kv_connector='HostTierConnector' to build_host_tier_connector",
    "lmdeploy.pytorch.kv_connector.factory:prepare_kv_connector_config":
        "refuse unsupported configurations at start-up; normalise the extra config",
    "lmdeploy.pytorch.paging.scheduler:Scheduler.__init__":
        "install the eviction hook (install_scheduler_hook) after construction",
    "lmdeploy.pytorch.paging.scheduler:Scheduler.preempt_seqs":
        "skip a sequence whose external load is in flight (its state has no evict; the loader owns it)",
    "lmdeploy.pytorch.engine.executor.base:ExecutorBase.__init__":
        "refuse model-dependent configurations before workers and weights load",
    "lmdeploy.pytorch.engine.executor.base:ExecutorBase._update_num_gpu_blocks":
        "compute host slots from host_cache_gb and the per-block bytes",
    "lmdeploy.cli.serve:SubCliServe.add_parser_api_server":
        "add --host-cache-gb / --host-cache-config to the PyTorch engine group",
    "lmdeploy.cli.serve:SubCliServe.api_server":
        "turn the flags into kv_transfer_config",
    "lmdeploy.cli.serve:SubCliServe.add_parser_proxy":
        "list --routing-strategy cache_aware and its options (proxy_routing.py)",
    "lmdeploy.cli.serve:SubCliServe.proxy":
        "install the cache_aware strategy on the live proxy module before the stock command runs",
    "lmdeploy.messages:PytorchEngineConfig":
        "accept host_cache_gb= / host_cache_config= keywords (wraps the generated __init__)",
    "lmdeploy.pytorch.engine.engine:Engine.get_schedule_metrics":
        "attach the host-tier counters to ScheduleMetrics",
    "lmdeploy.pytorch.engine.engine:Engine.update_params":
        "weights change in place: the shared store (l3) stops for this engine first",
    "lmdeploy.pytorch.engine.engine:Engine.update_weights_from_ipc":
        "weights change in place (checkpoint engine): the shared store stops first",
    "lmdeploy.pytorch.engine.engine:Engine.update_weights_from_distributed":
        "weights change in place (weights-update group): the shared store stops first",
    "lmdeploy.metrics.stats:SchedulerStats.update_from_schedule_metrics":
        "carry the host-tier counters to the stat loggers",
    "lmdeploy.metrics.loggers:LoggingStatLogger.log":
        "append the host-tier line to the periodic stats log",
    "lmdeploy.metrics.loggers:PrometheusStatLogger.__init__":
        "register the host-tier Prometheus collector",
    "lmdeploy.metrics.loggers:PrometheusStatLogger.record_schedule":
        "publish the host-tier counters to Prometheus",
    "lmdeploy.messages:GenerationConfig.__post_init__":
        "stamp the API request's cache salt on its generation config (request_salt.py)",
    "lmdeploy.pytorch.messages:SamplingParam.from_gen_config":
        "carry the config's cache salt to the SamplingParam the sequence keeps",
    "lmdeploy.serve.utils.server_utils:validate_json_request":
        "the JSON endpoints' dependency: wrapped to read the request's cache_salt / API-key salt",
    "lmdeploy.pytorch.paging.eviction_helper.recompute_eviction_helper:RecomputeEvictionHelper._reclaim_candidate":
        "reclaim a remote-ready request when its loaded blocks are in the prefix trie (deadlock fix; "
        "activate._reclaim_remote_ready repeats the stock steps after the is_remote_ready check)",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._async_step":
        "counts the forward step in flight (agents whose connector is ours), so sleep can wait for it",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.sleep":
        "waits for a forward step still executing (sent ahead of the sleep drain) before the stock body "
        "shuts the connector down under it (DP 1; DP > 1 already waits on to_sleep)",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.wakeup":
        "a released agent (its engine loop failed) raises one clear error instead of an AttributeError",
}
RELIED_TARGETS: dict[str, str] = {
    # target -> what we rely on (not rebound)
    "lmdeploy.pytorch.paging.block_trie.kv_lifecycle:KVBlockLifecycle._try_evict_leaf":
        "copied and extended by HostTierKVBlockLifecycle (demotion before detach)",
    "lmdeploy.pytorch.engine.engine:Engine.__init__":
        "calls prepare_kv_connector_config(model_path, dist_config, executor backend) before "
        "the executor; builds the scheduler connector from executor.cache_config",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.build_cache_engine":
        "builds the worker connector and registers connector_kv_caches",
    "lmdeploy.pytorch.engine.executor.base:ExecutorBase.update_configs":
        "sets states_shapes and disables prefix caching before _update_num_gpu_blocks, "
        "ships the cache config to workers after it",
    "lmdeploy.cli.serve:SubCliServe.add_parsers":
        "binds SubCliServe.api_server as the parser default when called",
    # the proxy the cache_aware strategy plugs into (proxy_routing.py)
    "lmdeploy.serve.proxy.proxy:NodeManager.get_node_url":
        "called with the model name (and role) by both routed endpoints; overridden by a subclass",
    "lmdeploy.serve.proxy.proxy:NodeManager.post_call":
        "called once per request after its response; the subclass ends the request's queued prefill there",
    "lmdeploy.serve.proxy.proxy:NodeManager.forward_raw_request_generate":
        "returns the node's non-streamed answer as text (the subclass reads errors from it)",
    "lmdeploy.serve.proxy.proxy:chat_completions_v1":
        "reads the module-level node_manager at call time; depends on validate_json_request",
    "lmdeploy.serve.proxy.proxy:completions_v1":
        "reads the module-level node_manager at call time; depends on validate_json_request",
    "lmdeploy.serve.proxy.proxy:NodeManager.pre_call":
        "called by the endpoint right after get_node_url, in its task; returns the start post_call receives",
    # the proxy renders a chat request as the node does (proxy_routing.PromptEncoder)
    "lmdeploy.serve.openai.protocol:ChatCompletionRequest":
        "the request model the node validates a chat body into",
    "lmdeploy.serve.core.chat_runner:ChatRunner.prepare":
        "the node's steps before get_prompt_input (response parser request, template kwargs), mirrored",
    "lmdeploy.serve.parsers.response_parser:BaseResponseParser.__init__":
        "the default parser's request steps: dump_tools then normalize_chat_request",
    "lmdeploy.serve.parsers.tool_parser.tool_parser:dump_tools":
        "keeps each tool's function part (what the chat template renders)",
    "lmdeploy.serve.parsers.response_parser:normalize_chat_request":
        "tool-call arguments as dicts, as the template renders them",
    "lmdeploy.serve.core.chat_runner:_chat_template_kwargs_from_request":
        "enable_thinking and reasoning settings folded into the template kwargs",
    "lmdeploy.serve.openai.api_server:set_parsers":
        "picks the gpt-oss response parser by the model's architecture, the default one otherwise",
    # the external-load path the connector drives (study sections 3-4)
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.try_load":
        "asks get_num_new_matched_tokens right after the local GPU match",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.apply_load_results":
        "turns KVLoadResult into publish (success) or rollback (failure)",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator._publish":
        "re-attaches loaded blocks to the trie and sets cached_tokens",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator._rollback":
        "frees the destination blocks of a failed load; the request recomputes",
    "lmdeploy.pytorch.kv_connector.base:KVConnectorOutputAggregator":
        "TP aggregation of finished ids and invalid block ids (ray executor)",
    "lmdeploy.pytorch.engine.cache_engine.engine:CacheEngine.connector_kv_caches":
        "one contiguous [pages, bytes] row per pool and layer, entry_axis=1",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._get_connector_kv_caches":
        "adds the MTP rows under the 'mtp.' prefix",
    # the sleep wait (activate._patch_model_agent) relies on these
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._async_loop_background":
        "runs the queued forward steps one at a time, in the agent's event loop, through self._async_step",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._drain_queues":
        "drops the queued forward inputs (and outputs) without running them; called before the wait",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.shutdown_kv_connector":
        "drains the queues again (the waited step's output), then shuts the connector down",
    "lmdeploy.pytorch.engine.engine:Engine.sleep":
        "drains the engine loop (no new forward is sent) before executor.sleep reaches the agents",
    # the reclaim fix (activate._reclaim_remote_ready) relies on these
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.is_remote_ready":
        "READY = loaded and published, the remaining prefill not admitted yet",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.release_tracking":
        "drops a non-LOADING load record and its soft prefill reservation",
    "lmdeploy.pytorch.paging.seq_states.states:SequenceLifecycle.release_paging_resources":
        "frees the request's blocks (trie-held blocks stay cached), resets its step and trie cursor",
    "lmdeploy.serve.openai.chat_completions.serving:register":
        "/v1/chat/completions depends on validate_json_request (bound by name at import)",
    "lmdeploy.serve.openai.endpoints.completions:register":
        "/v1/completions depends on validate_json_request (bound by name at import)",
    # per-request cache salts (salted_trie.py subclasses the trie; patches/0008)
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._get_or_create_root":
        "the only place roots are created (keyed adapter_name); overridden with the salted key",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._cursor_belongs_to_trie":
        "a root belongs when _roots holds it; overridden to look under the salted key",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._match_state_checkpoint_prefix":
        "SSM checkpoints are indexed by adapter only; its miss path is repeated for salted requests",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._match_block_prefix":
        "starts at the cursor or _get_or_create_root(seq.adapter_name); reaches nodes only through children",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._ensure_attached_allocation_cursor":
        "starts allocation at the cursor or _get_or_create_root(seq.adapter_name)",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie.match":
        "the one matching entry point (wrapped by the salted subclass to set the request's salt)",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie.allocate":
        "the one publishing entry point (wrapped by the salted subclass to set the request's salt)",
    # the executor plans host slots and hands tensor specs to the workers from this plan
    "lmdeploy.pytorch.engine.cache_engine.plan:build_block_cache_plan":
        "the block-cache plan every worker builds (tensor specs, packed layout) for host slot sizing",
    # trace capture reads an ended sequence's prompt from its token store (trace_capture.snapshot)
    "lmdeploy.pytorch.messages:SchedulerSequence.all_ids":
        "history_cache[:num_all_ids]: the prompt is the store's first input_end_pos ids",
    "lmdeploy.pytorch.messages:_HistoryDataBase.get_real":
        "a view of the ids appended so far (history_cache[...] slices it)",
    # trace capture's output length: the accepted ids (speculative decoding keeps unverified drafts
    # after them, which num_all_ids counts), the same as num_all_ids without drafts
    "lmdeploy.pytorch.messages:SchedulerSequence.num_valid_ids":
        "num_history_ids + num_token_ids: every id of a sequence without drafts",
    "lmdeploy.pytorch.strategies.ar_spec.sequence:SchedulerSequenceARSpec.num_valid_ids":
        "_num_valid_ids: the accepted ids only, drafts excluded",
    # a request that asks for its routed experts is never restored from host (connector lookup)
    "lmdeploy.pytorch.messages:SchedulerSequence.return_routed_experts":
        "sampling_param.return_routed_experts: the request wants per-token routed experts back",
    # nor one whose result scores its prompt tokens (connector lookup)
    "lmdeploy.pytorch.messages:SchedulerSequence.return_ce_loss":
        "sampling_param.out_ce_loss: the prompt's cross-entropy over the tokens the forward computes",
    "lmdeploy.pytorch.messages:SchedulerSequence.return_logits":
        "sampling_param.out_logits: logits are returned (output_logits 'generation' or 'all')",
    # salted_trie.install_salted_trie filters the stock checkpoint lookup's candidates by root salt
    "lmdeploy.pytorch.paging.block_trie.checkpoint:StateCheckpointIndex.candidates":
        "the only way _match_state_checkpoint_prefix reaches checkpoint nodes (a tuple of a key's bucket)",
    # data-parallel engines share the node's host memory and capture to one file each (activate.py)
    "lmdeploy.pytorch.config:DistConfig":
        "dp: the number of data-parallel engines; dp_rank: this engine's rank (0 <= dp_rank < dp)",
}

# sha256 of the target's source (inspect.getsource form) in LMDeploy 0.18.0. FILE_PINS below
# (sha256 of each whole file) only lets verify() skip parsing a file that is byte-identical.
PINS: dict[str, str] = {
    "lmdeploy.pytorch.kv_connector.factory:build_kv_connector":
        "4e83a74e1a4cc538e25bce7addbc4a0dd857d220aa1d50f97dff29e3f1daffff",
    "lmdeploy.pytorch.kv_connector.factory:prepare_kv_connector_config":
        "e31c862767ca65dd2913eb64df41bbbb89ecc80a012c7de970c53c5d1b0bcc89",
    "lmdeploy.pytorch.paging.scheduler:Scheduler.__init__":
        "21a709e2b298abccf6873f20b64912f52293041f5f5ee20d469caf25b90a39c8",
    "lmdeploy.pytorch.paging.scheduler:Scheduler.preempt_seqs":
        "75688739fcb8bbbb53fce8c202bdd26e336949bac6ef7961b982cf3461bac392",
    "lmdeploy.pytorch.engine.executor.base:ExecutorBase.__init__":
        "61712aee59d4be95c35804753ac8277fb36045002fa83ab3e81ae2fc9f8dc2e9",
    "lmdeploy.pytorch.engine.executor.base:ExecutorBase._update_num_gpu_blocks":
        "530062688135691989ca008948c707fbaee6b5b81e149f4e5130b50325827c1c",
    "lmdeploy.cli.serve:SubCliServe.add_parser_api_server":
        "6a2231a7ec444e1dc6d20ec0494ed1c620c80eef30c33f37f31ab20db29666c1",
    "lmdeploy.cli.serve:SubCliServe.api_server":
        "5e5a1a30562a820292783a812cc70e01ca63f4360f9b8202be2974148e0ce2bf",
    "lmdeploy.cli.serve:SubCliServe.add_parser_proxy":
        "92667a6cea5104434fb2582b1ce2e595920e31858dcc2bdcc9b6f328ad09a65b",
    "lmdeploy.cli.serve:SubCliServe.proxy":
        "ffc8d2ebe6a258634c9b5ff554c1efc84a9073f80f34ca300c7b2724a943c48d",
    "lmdeploy.messages:PytorchEngineConfig":
        "558b60649b26a08617d145dde55d2abd06c5c9b462343e1f1b6b0504b50f79b8",
    "lmdeploy.pytorch.engine.engine:Engine.get_schedule_metrics":
        "f9bb82dd6e489d89fd5a4ef7091f5873ea2fd2cc5d30a9a58e627910a2d8e738",
    "lmdeploy.pytorch.engine.engine:Engine.update_params":
        "b08a1f7211f237c19d8e271dbc3a2309a48da556fccaaff36b46f4a41dc2ef26",
    "lmdeploy.pytorch.engine.engine:Engine.update_weights_from_ipc":
        "3b0313b23da82d9ebb9620e141bc364b21edff388c0f545b5996bd144e16d562",
    "lmdeploy.pytorch.engine.engine:Engine.update_weights_from_distributed":
        "3d78f9a6857396fae20a4b58115fea5626d36a62f38ac2658201ad5dc1d3f695",
    "lmdeploy.metrics.stats:SchedulerStats.update_from_schedule_metrics":
        "fac90c4f092d142634daa6ad88070b0cb40143958a8c54033ba785213ce495f8",
    "lmdeploy.metrics.loggers:LoggingStatLogger.log":
        "fd2a4c836ed3368a15a80662b5b1696bc1bd887ba1be119a40cc8defc0eff519",
    "lmdeploy.metrics.loggers:PrometheusStatLogger.__init__":
        "f12e976021fa8cf4b6ba3c31728c0e013edc5bb50002eb639bcf68d53c9ecd20",
    "lmdeploy.metrics.loggers:PrometheusStatLogger.record_schedule":
        "67084499a3205ce210bc1a13fe1b00dfb755868c6f9b3822d1c02f3e0ec07939",
    "lmdeploy.messages:GenerationConfig.__post_init__":
        "9a2607fa45bd47262f31451df7d9d9e9e2c2ec221321f89bbd09d3bb3d8bc922",
    "lmdeploy.pytorch.messages:SamplingParam.from_gen_config":
        "6088d69e91cf42afdaa3d6ed3381ec36a15ef5fe21d311134e021b246c4cdfd2",
    "lmdeploy.serve.utils.server_utils:validate_json_request":
        "d256d687fd151798ce88ee6a4cf59a21cbcd2bb20927b1cbf4f61df6a592818f",
    "lmdeploy.pytorch.paging.eviction_helper.recompute_eviction_helper:RecomputeEvictionHelper._reclaim_candidate":
        "a5be2c37bc51c5648098b1b26655170b86d3ff8aef3cc51ee6ca5a844ec836c7",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._async_step":
        "03b3ed9babb0425718502ae3b94ee501efba9a92955eea8d6363e009301fb574",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.sleep":
        "106360dcc706911b6df8aa67b26c56d9e81f4617f79a47885a24387594afc2e6",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.wakeup":
        "1aa97ae89cdf985a3c8ec9428a1b0105003b4ccf2e3fa57878831f984487601b",
    "lmdeploy.pytorch.paging.block_trie.kv_lifecycle:KVBlockLifecycle._try_evict_leaf":
        "106752aaa3464858c936037e90ef2e89cf7c4e92491668ef8f7989a1b2c24670",
    "lmdeploy.pytorch.engine.engine:Engine.__init__":
        "ad1232624f0b2dccee70e66806faecb64a818fc2c92c4c1fd3c0fad4055c3096",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.build_cache_engine":
        "4a00cbe610f3d44252af69752ac570b64e3aa54ae320e55743e9ff989124edbc",
    "lmdeploy.pytorch.engine.executor.base:ExecutorBase.update_configs":
        "f6f38426f9ea1a1a56f8bb289859167ffe9127c422c6b32b54721e55bfa44415",
    "lmdeploy.cli.serve:SubCliServe.add_parsers":
        "2cd3e4a583cc92c91e65df012b71a0753ef5051c0b4d463a5ca2d8d4d9784938",
    "lmdeploy.serve.proxy.proxy:NodeManager.get_node_url":
        "9103cde26f4d066c51df878269d597edc6736d21f908665f43c64cb2439df2b5",
    "lmdeploy.serve.proxy.proxy:NodeManager.post_call":
        "c9fd77d96447e3e72052f1aaa7d9f0429d697c50490a636460752eb81d279150",
    "lmdeploy.serve.proxy.proxy:NodeManager.forward_raw_request_generate":
        "513f7c6cb11389ed697ae3708960a5a09f4b0eac246ab095c8f5bbc905b230f1",
    "lmdeploy.serve.proxy.proxy:chat_completions_v1":
        "3f7e928cfc7afd10605458a668f20a079b441fc8f254b5af61bd70834069673f",
    "lmdeploy.serve.proxy.proxy:completions_v1":
        "3db11720ceac0cd4a5d9e11a547b7d9720f06d24fa52cf3f16e8ab105dda0a6c",
    "lmdeploy.serve.proxy.proxy:NodeManager.pre_call":
        "45af0866e7a24bd33abed7138952c5bb61da38161646e76809856bdd3130ccaa",
    "lmdeploy.serve.openai.protocol:ChatCompletionRequest":
        "30d8a2523ef36532744b94f9315ee770c9538299dec7628620d37cede4f41d27",
    "lmdeploy.serve.core.chat_runner:ChatRunner.prepare":
        "c831a9bb1b431915e7b75e788e9f817be1dd9fb55cae161fb35ce83ef47eb329",
    "lmdeploy.serve.parsers.response_parser:BaseResponseParser.__init__":
        "94ae06832dcd860d29cae4b655fd3b4f103f290b9f1c1ad97911dda8bcb70fd0",
    "lmdeploy.serve.parsers.tool_parser.tool_parser:dump_tools":
        "2930e78beb476f64602e2fa52512d8541322cf7acda12b4ad9dc51a401b8a297",
    "lmdeploy.serve.parsers.response_parser:normalize_chat_request":
        "32b6794337b6de5a9de9bc3a50fa00cf43eda0b6bc2b4ba2279dfeff3fa62f88",
    "lmdeploy.serve.core.chat_runner:_chat_template_kwargs_from_request":
        "69f6fb80484fd052933ed8d4f72a6056c732fcbef5b21dce570c67df3dc27408",
    "lmdeploy.serve.openai.api_server:set_parsers":
        "0511260796df29d0ca7c4cbda3d98f3d6e2fb2fc2bd27a7875ac667f1f9bdf72",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.try_load":
        "0959aaeda8529d7d0e2b190b2251c57d755fdf3ed574514346cfe5aed33447b4",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.apply_load_results":
        "0bbb9936df577b4e5ab00356b72225747d3b0f6e2764eac581e150780f6e615f",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator._publish":
        "54d2cc8e4cd45240cf3747fae14b336edadf7eb74664645e97189f4648aabaf5",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator._rollback":
        "caa22027e489659b694de0004d2ece05d43e43cf9aa1308f7243c71745584c3b",
    "lmdeploy.pytorch.kv_connector.base:KVConnectorOutputAggregator":
        "f0ad6716fdaff76ee67a9faa70466ef5558da889100aef46a37b6b333b1388ec",
    "lmdeploy.pytorch.engine.cache_engine.engine:CacheEngine.connector_kv_caches":
        "bfa9a25ee53dcd171a5c64352fe9a7ca5799525a49d4bc18d32312682491ad7b",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._get_connector_kv_caches":
        "6652d187a76fef711498ccc4d78a36d88aa2e82ad062dfab67da808e26dd2174",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._async_loop_background":
        "247f12439ae4817041d5f7c7a3f102088b48c7a356ce5d82e8ced3ec731b4b73",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent._drain_queues":
        "6ea63273ccaead5d71d3905cc7ab80d7128d5f414a59a8b3279a122918a90a2a",
    "lmdeploy.pytorch.engine.model_agent.agent:BaseModelAgent.shutdown_kv_connector":
        "48c92196a419c7e8b3c7e865729a31e85ac4a20cc93daf182b16bf9f9d48e127",
    "lmdeploy.pytorch.engine.engine:Engine.sleep":
        "2a545e33dfbf8e8897c6abb87f6c47c78d969686c34cb3628aed7b0a9f568cc3",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.is_remote_ready":
        "154ebc88125377cb4630b9b2bc29eee1a899eb9929fd5603b6a7eeb64a1c0992",
    "lmdeploy.pytorch.paging.kv_load_coordinator:KVLoadCoordinator.release_tracking":
        "0d0a20deb48f73368f50c3fb77851f3b2a9691be26b08aea491a0df5ada07ccb",
    "lmdeploy.pytorch.paging.seq_states.states:SequenceLifecycle.release_paging_resources":
        "84f5b8e01991b187fa5894f3f7d918e720e110e1ff2f51ab25d11a47e5d65554",
    "lmdeploy.serve.openai.chat_completions.serving:register":
        "5003b2e3b22686be2b7db2b27d35a0a5c3d9e0c05e0218c4acc460d114d487bc",
    "lmdeploy.serve.openai.endpoints.completions:register":
        "11829ad35e734cafa48d2b741a9eb5906d164dec2ccca335ea819a1d70eb369d",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._get_or_create_root":
        "0cb3f588453f6a5cf8683a37f9fc202381df467672eb59d4a6c87ea76e9eb70e",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._cursor_belongs_to_trie":
        "0f371a2604b6b9cbbbf199c8d58e058b69fd473fbb1572faa12792a2e9feb1fc",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._match_state_checkpoint_prefix":
        "a925188c30224ba39d0530b158ec315489ee7cac11a4e91407bca496ec4ab213",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._match_block_prefix":
        "45ebf843bce95b6fa8d628889d3a73c19e334f1c11fc73ced66aa66aa642db85",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie._ensure_attached_allocation_cursor":
        "2d1542bdce806b894f68d36ccc79518ac58698f75db58040fd3f2d767ebf76c5",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie.match":
        "65f441eeaed1222cd7eb22b39bf2e87ab7b5bc1dc48b0bf0235cc75d961338c3",
    "lmdeploy.pytorch.paging.block_trie.trie:BlockTrie.allocate":
        "d02c88a20dae7cd246f306fe81a6efd8aece5e33f26eab469001aa1b22f46faf",
    "lmdeploy.pytorch.engine.cache_engine.plan:build_block_cache_plan":
        "ae8d890c1f625f782d4110f92eaccdd0b35e9539d09e5809a709a7b85fd367ca",
    "lmdeploy.pytorch.messages:SchedulerSequence.all_ids":
        "d46d7e94dfb5c48144eb8060688482c8407ffd58ebe101784d0ac677fb70ba27",
    "lmdeploy.pytorch.messages:_HistoryDataBase.get_real":
        "51d7cefd56556da3e23bc14af984660f903d111275d63195a6153505170a4252",
    "lmdeploy.pytorch.messages:SchedulerSequence.num_valid_ids":
        "94bad251c77508230ac68d948cd2f8553ed5db2a21113f2304aeae9ffa7922a3",
    "lmdeploy.pytorch.strategies.ar_spec.sequence:SchedulerSequenceARSpec.num_valid_ids":
        "a8e7c2d94173a649971fd8f7c37e12c8d575907891ffc0de2a9a7c5bc2c0f4f5",
    "lmdeploy.pytorch.messages:SchedulerSequence.return_routed_experts":
        "f54755b2ca6335dda3cb4961d259c9a4aff24f63643bd0c8c6badb50129a0a49",
    "lmdeploy.pytorch.messages:SchedulerSequence.return_ce_loss":
        "3594f8009be0ba0f0cfdc18b86c0e7ee1ef343d96c3a1991ab0eb650bcd66e96",
    "lmdeploy.pytorch.messages:SchedulerSequence.return_logits":
        "30610e8465d672cff7944bf487dc359284b806931c488045a85b33dc5f733ae8",
    "lmdeploy.pytorch.paging.block_trie.checkpoint:StateCheckpointIndex.candidates":
        "f4c45444d306d59f3ddfae400f57340b3e96b3473d8787f6d4048462506c249a",
    "lmdeploy.pytorch.config:DistConfig":
        "7b2cb85ccd4e2cc0c38c170c57246b7a957a00331386bee9b59199fb1bf867bb",
}
FILE_PINS: dict[str, str] = {
    "lmdeploy.pytorch.kv_connector.factory":
        "efd235a78280e728d6deafe838cc20e66ec6e7232c9cf8b1f1aa3f921b0f43e6",
    "lmdeploy.pytorch.paging.scheduler":
        "d4216b78de44bda7c818654668ff27c1c6ef019bded5cea91cc47204844c2b57",
    "lmdeploy.pytorch.engine.executor.base":
        "3a387d8464611bbc14e7358cb3792427e9c63b34c8377db9fc652c9c0bd09298",
    "lmdeploy.cli.serve":
        "a9f759295c65cd62de1e15e0c4e1c6d69e6ef4fb50e7d9e21eebc81a077be825",
    "lmdeploy.messages":
        "1957d62219f3ac4aeeaa45da46b89a3db1b46c9159e7ec6187ba9722e4bd3b7d",
    "lmdeploy.pytorch.engine.engine":
        "3a2830561003ac79977b17a50c5fc5ca0006bd7304d8370f658f4c3b4047f295",
    "lmdeploy.metrics.stats":
        "7585fbc6e76d04a7e8e736f1cf3a49dd7a45a4b772d91fcae89751ea6bfa103b",
    "lmdeploy.metrics.loggers":
        "253175aebf0bd6f8aeefeed872bdfb0882fbe5553f7193e1d1f3fdd07dd85dd2",
    "lmdeploy.pytorch.messages":
        "663c32417be853455805c3e2f7960af479c857b00b4f4e0a0e0f8017e6b43c54",
    "lmdeploy.serve.utils.server_utils":
        "be6e71d3f04845e76417bcd74e9a40819b4394ee3b20175128a63584ba7742ef",
    "lmdeploy.pytorch.paging.eviction_helper.recompute_eviction_helper":
        "a9ae91e4b252d10e090f03b7ab6ef95ca40b882c28b9762e9581204452965e90",
    "lmdeploy.pytorch.engine.model_agent.agent":
        "99fb1968a3fb086d99eb018e352b1db4df2c5900a2b7fc461438da585f406913",
    "lmdeploy.pytorch.paging.block_trie.kv_lifecycle":
        "6f2b1b9cb4c0974af2e1afdb01ee61889100010597e563cb11a9a6b496ec18bd",
    "lmdeploy.serve.proxy.proxy":
        "7b7f751f8b21a998bc4b2e08d24b5b3e4ba7c9b7745fa8e1a27920469c58016f",
    "lmdeploy.serve.openai.protocol":
        "5b348346b5f716bfc4fc7622799860e7e4a8881e6694c5e43e1342c00374ad28",
    "lmdeploy.serve.core.chat_runner":
        "f98e3a4f3d98c3d7e968bcbe0303af126792e44fbbabfeda2e21695e7561f203",
    "lmdeploy.serve.parsers.response_parser":
        "ad3ef3b76c144c73232d88439aa643cac00e29c1bac879c3545c4f16f47360f8",
    "lmdeploy.serve.parsers.tool_parser.tool_parser":
        "3473276810de9b04d709f9de69d521dc53cbd296f82dd53b546110b53e9eca89",
    "lmdeploy.serve.openai.api_server":
        "96d2da0c737c8c4ec29d432a47ba4111c8fddece25bca1628a1b0a8de07b0f08",
    "lmdeploy.pytorch.paging.kv_load_coordinator":
        "701ca0b08df191519e418a66faf485fb148bd8a84219231cdfe7377b8e5ae1f2",
    "lmdeploy.pytorch.kv_connector.base":
        "50e51a2bd127b5946d68a0add775e75b513b7c33c06f4b8f767b5d3b13341831",
    "lmdeploy.pytorch.engine.cache_engine.engine":
        "2952c8c1beb711da4085f4b13b20fb29321043564ab6f8c3c44466ade08b6b2f",
    "lmdeploy.pytorch.paging.seq_states.states":
        "e1b2d83b4f1c0fa401985e90f1f67bc035f6c91bc1d253dbf5e9300cba57cf21",
    "lmdeploy.serve.openai.chat_completions.serving":
        "c5e1b78a0034ec42c00e085b51738be1855d8883ad54d5211c5c9722204d4b9a",
    "lmdeploy.serve.openai.endpoints.completions":
        "915c1f0ee251dc76149959ed9d34ef7d8a1308431cab8f589f594a41290fefc3",
    "lmdeploy.pytorch.paging.block_trie.trie":
        "46a1e0f76bf9cf6437ae28fb44f609b81d9ef67b6f039d0efb4972351ddb5ec1",
    "lmdeploy.pytorch.engine.cache_engine.plan":
        "36f112a1e6a5dea78dd8d487d2b60f44cf0588d169bda9cf730ce64fd1f7b05d",
    "lmdeploy.pytorch.strategies.ar_spec.sequence":
        "339df00ebe6260eba71b5a0a5107f5928e060ff5e6136536b4721523b003fdd9",
    "lmdeploy.pytorch.paging.block_trie.checkpoint":
        "26140ca798444f70892c677df63e4a7ce605f7317516532b506ad99f2cb2635d",
    "lmdeploy.pytorch.config":
        "131bb0c0d03fa2c9504b1768c91c0febfe128d7a163799df8cbdde63915518a9",
}


@dataclass
class GuardResult:
    """Outcome of ``verify``: ``ok`` only when the version and every pin match."""

    ok: bool
    version: str | None
    problems: list[str] = field(default_factory=list)

    def message(self) -> str:
        if self.ok:
            return f"LMDeploy {self.version}: version and {len(PINS)} source pins match"
        return ("lmdeploy-hostcache not activated, LMDeploy runs as stock: "
                + "; ".join(self.problems))


def lmdeploy_root() -> Path | None:
    """Directory of the installed ``lmdeploy`` package, found without importing it."""
    mod = sys.modules.get("lmdeploy")
    if mod is not None:
        paths = list(getattr(mod, "__path__", None) or [])
        return Path(paths[0]) if paths else None
    try:
        spec = importlib.util.find_spec("lmdeploy")  # top-level: searches sys.path, imports nothing
    except (ImportError, ValueError):
        return None
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locs[0]) if locs else None


def installed_lmdeploy_version(root: Path | None = None) -> str | None:
    """LMDeploy's version from its own ``version.py`` (what the package reports), else metadata."""
    root = root if root is not None else lmdeploy_root()
    if root is not None:
        try:
            text = (root / "version.py").read_text(encoding="utf-8")
        except OSError:
            text = ""
        m = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.M)
        if m:
            return m.group(1)
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("lmdeploy")
    except PackageNotFoundError:
        return None


def _module_file(root: Path, module: str) -> Path:
    parts = module.split(".")
    if parts[0] != "lmdeploy":
        raise ValueError(f"guard target outside lmdeploy: {module}")
    base = root.joinpath(*parts[1:])
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return base.with_suffix(".py")


def _find_def(tree: ast.Module, qualname: str) -> ast.AST | None:
    body = tree.body
    node: ast.AST | None = None
    for part in qualname.split("."):
        node = None
        for item in body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and item.name == part:
                node = item  # the last definition wins, as at run time
        if node is None:
            return None
        body = getattr(node, "body", [])
    return node


def _read_module(root: Path, module: str, cache: dict | None) -> tuple[Path, str, ast.Module]:
    path = _module_file(root, module)
    if cache is not None and path in cache:
        return cache[path]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LookupError(f"{module}: cannot read {path} ({exc.strerror})") from None
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise LookupError(f"{module}: {path} does not parse ({exc.msg})") from None
    if cache is not None:
        cache[path] = (path, text, tree)
    return path, text, tree


def target_source(target: str, root: Path | None = None, *, _cache: dict | None = None) -> str:
    """Source text of ``target`` read from the installed file (no import).

    Raises LookupError naming the target when the file or the definition is missing.
    """
    root = root if root is not None else lmdeploy_root()
    if root is None:
        raise LookupError("lmdeploy is not installed")
    module, _, qualname = target.partition(":")
    try:
        path, text, tree = _read_module(root, module, _cache)
    except LookupError as exc:
        raise LookupError(f"{target}: {exc}") from None
    node = _find_def(tree, qualname)
    if node is None:
        raise LookupError(f"{target}: no such definition in {path}")
    lines = text.splitlines(keepends=True)
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[start - 1:node.end_lineno])


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def verify(root: Path | None = None, *, version: str | None = None,
           pins: dict[str, str] | None = None) -> GuardResult:
    """Check the LMDeploy version and every source pin; collect every problem found.

    ``version``/``pins``/``root`` exist for tests (a fake version, a modified copy).
    """
    root = root if root is not None else lmdeploy_root()
    pins = PINS if pins is None else pins
    if root is None:
        return GuardResult(False, None, ["lmdeploy is not installed"])
    found = version if version is not None else installed_lmdeploy_version(root)
    problems: list[str] = []
    if found != SUPPORTED_LMDEPLOY_VERSION:
        problems.append(f"LMDeploy version is {found}, this build supports exactly {SUPPORTED_LMDEPLOY_VERSION}")
    if not pins:
        problems.append("no source pins are recorded (run `python -m lmdeploy_hostcache.integration.guard "
                        "--print-pins` on LMDeploy 0.18.0)")
    cache: dict = {}  # each file is read and parsed once
    by_module: dict[str, list[str]] = {}
    for target in pins:
        by_module.setdefault(target.partition(":")[0], []).append(target)
    for module, targets in by_module.items():
        # Fast path: a file byte-identical to the one the pins were computed from needs no parse
        # (only with the committed pins: tests pass their own).
        if pins is PINS and FILE_PINS.get(module) is not None and _file_digest(root, module) == FILE_PINS[module]:
            continue
        for target in targets:
            want = pins[target]
            try:
                got = source_digest(target_source(target, root, _cache=cache))
            except LookupError as exc:
                problems.append(str(exc))
                continue
            if got != want:
                problems.append(f"the source of {target} differs from LMDeploy {SUPPORTED_LMDEPLOY_VERSION} "
                                f"(sha256 {got[:12]}..., pinned {want[:12]}...)")
    return GuardResult(ok=not problems, version=found, problems=problems)


def _file_digest(root: Path, module: str) -> str | None:
    try:
        return hashlib.sha256(_module_file(root, module).read_bytes()).hexdigest()
    except OSError:
        return None


def compute_pins(root: Path | None = None) -> dict[str, str]:
    """Digests of every target as installed now (to regenerate ``PINS``)."""
    targets = list(PATCHED_TARGETS) + list(RELIED_TARGETS)
    return {t: source_digest(target_source(t, root)) for t in targets}


def compute_file_pins(root: Path | None = None) -> dict[str, str]:
    """sha256 of each whole file holding a target (to regenerate ``FILE_PINS``)."""
    root = root if root is not None else lmdeploy_root()
    modules = dict.fromkeys(t.partition(":")[0] for t in list(PATCHED_TARGETS) + list(RELIED_TARGETS))
    return {m: _file_digest(root, m) for m in modules}


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lmdeploy_hostcache.integration.guard",
                                description="Check (or print) the LMDeploy source pins.")
    p.add_argument("--print-pins", action="store_true", help="print PINS computed from the installed LMDeploy")
    args = p.parse_args(argv)
    if args.print_pins:
        print("PINS: dict[str, str] = {")
        for target, digest in compute_pins().items():
            print(f'    "{target}":\n        "{digest}",')
        print("}")
        print("FILE_PINS: dict[str, str] = {")
        for module, digest in compute_file_pins().items():
            print(f'    "{module}":\n        "{digest}",')
        print("}")
        return 0
    result = verify()
    print(result.message())
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
