"""lmdeploy-hostcache: a host-memory (DRAM) prefix-cache tier for LMDeploy's PyTorch engine."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "lmdeploy_hostcache" / "__init__.py").read_text()).group(1)

setup(
    name="lmdeploy-hostcache",
    version=VERSION,
    description="Host-memory (DRAM) prefix KV-cache tier for LMDeploy's PyTorch engine",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lmdeploy_hostcache", "lmdeploy_hostcache.*"]),
    package_data={"lmdeploy_hostcache": ["data/*", "data/**/*"]},
    include_package_data=True,
    install_requires=[
        "lmdeploy==0.18.0",
        "torch",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "xxhash>=3.0",
        "PyYAML>=6.0",
        "numpy",
        "tqdm",
        "psutil",
    ],
    extras_require={
        "plot": ["matplotlib"],
        "metrics": ["prometheus_client"],
        "test": ["pytest", "hypothesis", "matplotlib"],
    },
    entry_points={"console_scripts": ["lmdeploy-hostcache = lmdeploy_hostcache.cli:main"]},
)
