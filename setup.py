"""xtf-kernels: fused masked cross-entropy kernels and explainable token-level noise filtering.

The native CPU backend (csrc/) is compiled on first use with torch.utils.cpp_extension and
ninja, into a per-user cache, so installation needs no compiler and no torch at build time.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    """Copy the top-level csrc/ sources into the wheel as xtf_kernels/csrc/ (compiled on first use)."""

    def run(self) -> None:
        super().run()
        src = Path(__file__).parent / "csrc"
        if src.is_dir():
            dst = Path(self.build_lib) / "xtf_kernels" / "csrc"
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.suffix in (".cpp", ".h", ".hpp"):
                    shutil.copy2(f, dst / f.name)


# Extras, decided once (README, "Installation extras"): `xtf` is everything the `xtf` command,
# the demo and the Hugging Face Trainer / LoRA integrations need; `trl` and `test` add to it.
XTF = [
    "transformers>=4.46",
    "tokenizers>=0.20",
    "pyarrow>=14",
    "matplotlib>=3.7",
    "datasets>=2.18",
    "accelerate>=0.34",  # the Hugging Face Trainer path
    "peft>=0.12",  # LoRA fine-tuning
]
EXTRAS = {
    "xtf": XTF,
    "trl": [*XTF, "trl>=0.12"],
    "bench": ["matplotlib>=3.7", "cut-cross-entropy>=25.1"],
    "test": [*XTF, "trl>=0.12", "pytest>=7", "hypothesis>=6", "scikit-image>=0.22", "ruff>=0.5"],
}

here = Path(__file__).parent
version = {}
exec((here / "xtf_kernels" / "_version.py").read_text(), version)

setup(
    name="xtf-kernels",
    version=version["__version__"],
    description="Fused masked cross-entropy kernels with per-token statistics, and XTF token filtering",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["xtf_kernels", "xtf_kernels.*"]),
    package_data={"xtf_kernels": ["csrc/*.cpp", "csrc/*.h", "py.typed"]},
    include_package_data=True,
    # A range, never a pin: a user's own CUDA torch satisfies it and is kept. The CPU set-up
    # commands in the README pin torch==2.13.0 explicitly.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pybind11>=2.10",
        "ninja>=1.11",
    ],
    extras_require=EXTRAS,
    cmdclass={"build_py": BuildPyWithCsrc},
    entry_points={"console_scripts": ["xtf=xtf_kernels.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
