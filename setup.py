"""Build of din_kernels: the Python package and its compiled extension ``din_kernels._C`` (csrc/).

The CPU kernels (csrc/cpu, csrc/register.cpp) are built on any machine with a C++ compiler and OpenMP; a compile
error fails the install (loudly: never a silent pure-Python install). ``DIN_KERNELS_SKIP_EXTENSION=1`` asks for a
pure-Python install on purpose. The CUDA kernels (csrc/cuda/*.cu) join the same extension when torch is a CUDA build
and nvcc is found (``CUDA_HOME``), unless ``DIN_KERNELS_SKIP_CUDA_BUILD=1``; a missing toolkit is a warning and a
CPU-only build. ``TORCH_CUDA_ARCH_LIST`` is honoured (default ``9.0`` when no GPU is visible), and ``MAX_JOBS`` sets
the parallel compile jobs (ninja).

The CPU kernels are compiled for the building machine's instruction set (``-march=native``; the extension is built
from source where it runs); ``DIN_KERNELS_CPU_FLAGS`` replaces those flags (e.g. ``-march=x86-64-v3``) for a build
meant for other machines. Build in place for incremental rebuilds: ``python setup.py build_ext --inplace``.
"""

import ast
import glob
import os
import shutil
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _schemas() -> tuple[dict, tuple]:
    """``(SCHEMAS, COMPILED)`` of din_kernels/ops/schema.py, read without importing the package."""
    with open(os.path.join(HERE, "din_kernels", "ops", "schema.py")) as f:
        tree = ast.parse(f.read())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if isinstance(node.value, ast.Dict):
                values[name] = {ast.literal_eval(k): values[v.id] if isinstance(v, ast.Name) else ast.literal_eval(v)
                                for k, v in zip(node.value.keys, node.value.values)}
            else:
                values[name] = ast.literal_eval(node.value)
    return values["SCHEMAS"], values["COMPILED"]


def _write_schema_header(capability: str) -> None:
    """csrc/generated/schemas.h: the compiled ops' schemas as C string macros (rewritten only when it changes)."""
    schemas, compiled = _schemas()
    lines = ["// Written by setup.py from din_kernels/ops/schema.py; do not edit.", "#pragma once", "",
             f'#define DIN_CPU_CAPABILITY "{capability}"', "", "#define DIN_COMPILED_SCHEMAS(X) \\"]
    lines += [f'  X("{name}", "{schemas[name]}") \\' for name in compiled]
    text = "\n".join(lines) + "\n\n"
    path = os.path.join(CSRC, "generated", "schemas.h")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _cpu_flags() -> tuple[list[str], str]:
    """Compiler flags of the CPU kernels and the name of the ATen vector width they select."""
    if "DIN_KERNELS_CPU_FLAGS" in os.environ:
        flags = os.environ["DIN_KERNELS_CPU_FLAGS"].split()
    else:
        flags = ["-march=native"]
    cpu = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    cpu = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    native = "-march=native" in flags
    if native and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu:
        return flags + ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"], "AVX512"
    if native and {"avx2", "fma"} <= cpu:
        return flags + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], "AVX2"
    return flags + ["-DCPU_CAPABILITY=DEFAULT"], "DEFAULT"


def _cuda_include_dirs(torch) -> list[str]:
    """The ``nvidia/cu13/include`` folders of the installed CUDA wheels (torch's CUDA 13 builds keep the headers of
    cuBLAS, cuSPARSE, ... there, next to torch itself)."""
    import site

    bases = [os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))]
    bases += site.getsitepackages() + [site.getusersitepackages()]
    dirs = []
    for base in bases:
        for d in glob.glob(os.path.join(base, "nvidia", "cu13", "include")):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _cxx_std(torch) -> str:
    """The C++ standard of the build: C++20 from torch 2.14 on (its headers require it), else C++17."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _extension_modules():
    if _env_on("DIN_KERNELS_SKIP_EXTENSION"):
        warnings.warn("DIN_KERNELS_SKIP_EXTENSION is set: installing din_kernels without its compiled extension "
                      "(backends 'cpu' and 'cuda' will be unavailable)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError("building din_kernels' compiled extension needs torch at build time: install torch "
                           "first, then `pip install --no-build-isolation .` (or set DIN_KERNELS_SKIP_EXTENSION=1 "
                           "for a pure-Python install)") from exc
    cpu_flags, capability = _cpu_flags()
    _write_schema_header(capability)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # torch's headers carry clang/nvcc-only pragmas (#pragma unroll), and GCC reports the masked AVX-512 loads of
    # ATen's at::vec (_mm512_undefined_ps as the masked-off lanes) as "may be used uninitialized" wherever they
    # inline; torch 2.13's headers use C++20 bit-field initialisers under C++17: all silenced so that a warning of
    # our own code stands out
    quiet = ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Wno-c++20-extensions"]
    cxx = ["-O3", "-fopenmp", _cxx_std(torch), *cpu_flags, *quiet]
    include_dirs = [CSRC]
    use_cuda = False
    if cuda_sources and not _env_on("DIN_KERNELS_SKIP_CUDA_BUILD"):
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            warnings.warn("torch is a CPU build: din_kernels' CUDA kernels are not built (CPU kernels only)")
        elif CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
                os.path.join(CUDA_HOME or "", "bin", "nvcc")):
            warnings.warn("nvcc not found (set CUDA_HOME): din_kernels' CUDA kernels are not built (CPU kernels only)")
        else:
            use_cuda = True
    kwargs = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        kwargs["include_dirs"] = include_dirs + _cuda_include_dirs(torch)
        ext = CUDAExtension("din_kernels._C", sources + cuda_sources,
                            extra_compile_args={"cxx": cxx + ["-DDIN_WITH_CUDA"],
                                                "nvcc": ["-O3", "-lineinfo", _cxx_std(torch), "-DDIN_WITH_CUDA",
                                                         "--expt-relaxed-constexpr"]},
                            **kwargs)
    else:
        ext = CppExtension("din_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


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
    extras_require={"triton": ["triton>=3.2"], "train": ["pandas", "scikit-learn", "tqdm"], "plots": ["matplotlib"],
                    "torchrec": ["torch==2.13.0", "fbgemm-gpu-cpu==1.8.0", "tensordict==0.15.3", "torchmetrics==1.0.3",
                                 "pyre-extensions==0.0.32"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
