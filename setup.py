from setuptools import find_packages, setup

setup(
    name="moe-flashcomm",
    version="0.1.0",
    description="Low-bit (2-8 bit, fp8) all-to-all and all-reduce for Mixture-of-Experts "
                "expert parallelism, with DeepSpeed integration",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_flashcomm", "moe_flashcomm.*"]) + ["moe_flashcomm.csrc"],
    # The top-level csrc/ ships as moe_flashcomm/csrc: compiled at first use (the kernels by
    # NVRTC, the launcher by torch's extension builder), no build step.
    package_dir={"moe_flashcomm.csrc": "csrc"},
    package_data={"moe_flashcomm.csrc": ["*.cu", "*.cuh", "*.cpp"]},
    install_requires=["torch>=2.3", "deepspeed>=0.16"],
    extras_require={
        "cuda12": ["cupy-cuda12x>=13"],
        "cuda13": ["cupy-cuda13x>=13"],
        "dev": ["pytest>=7", "tqdm", "matplotlib", "numpy"],
    },
)
