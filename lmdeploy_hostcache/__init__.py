"""lmdeploy-hostcache: a host-memory (DRAM) prefix KV-cache tier for LMDeploy's PyTorch engine."""

__version__ = "0.1.0"
SUPPORTED_LMDEPLOY_VERSION = "0.18.0"
