"""lmdeploy-hostcache: a host-memory (DRAM) prefix-cache tier for LMDeploy's PyTorch engine."""
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
# Auto-loader: a .pth at the root of site-packages that installs lmdeploy-hostcache's
# post-import hook in every interpreter (engine, spawned engines, Ray actors).
PTH_NAME = "lmdeploy_hostcache_autoload.pth"
PTH_SOURCE = HERE / "lmdeploy_hostcache" / "integration" / PTH_NAME


class build_py_with_pth(build_py):
    """build_py that also puts the auto-loader .pth at the root of the (editable) wheel.

    Regular wheel (`pip install .`): copied to build_lib, whose root is the wheel's root.
    Editable wheel (`pip install -e .`, PEP 660): build_lib is a scratch directory there,
    so the file goes to the directory setuptools' editable_wheel packs as the wheel
    (the `install_lib` it configures); either way pip installs it into site-packages and
    lists it in RECORD, so `pip uninstall` removes it.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target_dir = Path(self.get_finalized_command("install").install_lib)
        else:
            target_dir = Path(self.build_lib)
        target_dir.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(PTH_SOURCE), str(target_dir / PTH_NAME), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib) / PTH_NAME))
        return outputs

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
    package_data={"lmdeploy_hostcache": ["data/*", "data/**/*", f"integration/{PTH_NAME}"]},
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
        "test": ["pytest", "pytest-xdist", "hypothesis", "matplotlib"],
    },
    cmdclass={"build_py": build_py_with_pth},
    entry_points={"console_scripts": ["lmdeploy-hostcache = lmdeploy_hostcache.cli:main"]},
)
