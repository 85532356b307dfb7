"""Testing helpers for running LMDeploy's real PyTorch engine without a GPU.

Production code never imports this package. Nothing here has side effects on import:
the CPU shim is installed only by an explicit ``cpu_shim.install()`` call (process-wide
and irreversible, so tests call it in a subprocess of their own).

- ``cpu_shim``: fake ``torch.cuda`` runtime + cuda->cpu device redirection + Triton
  interpreter fixes, so LMDeploy's CUDA backend runs its Triton kernels on CPU tensors.
- ``models``: tiny random-weight Llama / Qwen2 checkpoints and a word-level tokenizer,
  written locally (no download).
- ``compare``: token-by-token comparison of generated outputs (equality and agreement).
- ``engine_runner``: multi-turn conversations through ``Engine.from_pretrained`` in a
  subprocess, returning tokens and host-tier counters as JSON.
- ``sleep_race``: ``Engine.sleep`` while the forward step sent ahead of the sleep drain is still
  executing in the agent (the race made deterministic), in a subprocess; JSON result.
- ``server``: a context manager that starts ``lmdeploy serve api_server`` on 127.0.0.1.
- ``harness``: the engine-in-the-loop CPU harness (LMDeploy's real ``Scheduler`` and engine-loop
  order, a prefix-oracle forward, byte checks of every GPU block and host slot); used by the
  tests and by ``lmdeploy-hostcache soak``.
"""
