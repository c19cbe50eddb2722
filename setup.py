"""Build of din_kernels: pure Python always; the compiled extension (csrc/) only when it can be built.

``DIN_KERNELS_SKIP_CUDA_BUILD=1``, a CPU-only torch, a missing nvcc or a missing csrc/ give a pure-Python install
with a warning, never a failed install.
"""

import glob
import os
import shutil
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not sources and not cuda_sources:
        return [], {}
    if os.environ.get("DIN_KERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        warnings.warn("DIN_KERNELS_SKIP_CUDA_BUILD is set: installing din_kernels without its compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: installing din_kernels without its compiled extension")
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        warnings.warn("no CUDA torch or no nvcc: installing din_kernels without its compiled extension "
                      "(the triton and torch backends are unaffected)")
        return [], {}
    ext = CUDAExtension(
        "din_kernels._C",
        sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_modules()

setup(
    name="din_kernels",
    version="0.1.0",
    description="Fast, faithful Deep Interest Network (DIN) ops for PyTorch: target attention, Dice, MBA L2",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["din_kernels", "din_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "train": ["pandas", "scikit-learn", "tqdm"], "plots": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
