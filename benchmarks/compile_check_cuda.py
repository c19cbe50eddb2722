"""Compile report of the CUDA C++ kernels (csrc/cuda) for a CUDA target, on a machine without a GPU.

    .venv-cuda/bin/python benchmarks/compile_check_cuda.py                    # sm_90, a table on stdout
    .venv-cuda/bin/python benchmarks/compile_check_cuda.py --out results/x.jsonl   # also JSON lines and x.md

Runs with a CUDA build of torch (its headers) and nvcc (``CUDA_HOME``, default /usr/local/cuda): every
``csrc/cuda/*.cu`` is compiled with the flags of the extension's build (setup.py: torch's nvcc flags, ``-O3``,
``-gencode=arch=compute_<N>,code=sm_<N>``) plus ``-Xptxas -v``, and per kernel (every template instantiation) the
report gives the registers per thread, the spill stores and loads, the stack frame, the static shared memory and the
barriers that ptxas reports. The attention kernels' tiles live in dynamic shared memory, sized at launch: the report
adds, for the main shapes, the launch each kernel takes on an sm_90 GPU (rows a tile, where the backward's partial sums
live, bytes; din_kernels/_cuda_plan.py mirrors the launcher's plan). The kernels take D and the
widths at run time, so one instantiation (per dtype) serves every shape. Exit status 1 when a file fails to compile.
Nothing runs: the numerics are tested on a GPU (tests/test_cuda_kernels.py, benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the main shapes of the dynamic shared-memory table: (D, hidden widths)
SHAPES = [(128, (80, 40)), (64, (200, 80)), (256, (80, 40)), (256, (256,)), (128, (200, 80, 40)), (32, (24, 12))]


def nvcc_command(source: str, arch: int, out: str) -> list[str]:
    """nvcc's command line for one source, as the extension's build (setup.py) compiles it."""
    import torch
    from torch.utils import cpp_extension

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    torch_dir = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    includes = [os.path.join(ROOT, "csrc"), *cpp_extension.include_paths("cuda"), os.path.join(cuda_home, "include"),
                *glob.glob(os.path.join(torch_dir, "nvidia", "cu13", "include"))]
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"
    import sysconfig

    includes.append(sysconfig.get_paths()["include"])
    return [os.path.join(cuda_home, "bin", "nvcc"), "-c", source, "-o", out, *[f"-I{d}" for d in includes],
            *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", "-O3", "-lineinfo", std,
            "-DDIN_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
        return dict(zip(names, out.splitlines()))
    except OSError:
        return {n: n for n in names}


def _short(name: str) -> tuple[str, str]:
    """``(kernel, element type)`` of a demangled name: ``din::cuda::(anonymous namespace)::x_kernel<__half>(...)``."""
    base = re.sub(r"\(.*$", "", name.replace("(anonymous namespace)::", ""))
    base = re.sub(r"^void ", "", base.replace("din::cuda::", ""))
    m = re.match(r"([\w:]+)<(.+)>$", base)
    if not m:
        return base, ""
    dtype = {"float": "float32", "double": "float64", "__half": "float16", "__nv_bfloat16": "bfloat16"}.get(
        m.group(2), m.group(2))
    return m.group(1), dtype


def parse_ptxas(text: str) -> list[dict]:
    """One row per compiled entry function of ``ptxas -v``'s output."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": int(m.group(2))}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            current["barriers"] = int(b.group(1)) if b else 0
            current["static_smem"] = int(s.group(1)) if s else 0
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"], r["dtype"] = _short(names[r["mangled"]])
    return rows


def compile_file(source: str, arch: int, tmp: str) -> tuple[list[dict], float, str | None]:
    out = os.path.join(tmp, os.path.basename(source) + ".o")
    t0 = time.perf_counter()
    proc = subprocess.run(nvcc_command(source, arch, out), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return [], seconds, (proc.stderr or proc.stdout)[-4000:]
    return parse_ptxas(proc.stdout + proc.stderr), seconds, None


def launch_rows() -> list[dict]:
    """The dynamic shared memory of the attention kernels' launches at the main shapes (sm_90's 227 KB a block)."""
    import importlib.util

    # by path: importing the package would load din_kernels._C, which may be built against another torch
    spec = importlib.util.spec_from_file_location("_cuda_plan", os.path.join(ROOT, "din_kernels", "_cuda_plan.py"))
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)

    rows = []
    for D, widths in SHAPES:
        for dtype, f32 in (("bfloat16", False), ("float32", True)):
            row = {"D": D, "hidden": list(widths), "dtype": dtype}
            for kind in ("fwd", "stats", "bwd"):
                launch = ext.cuda_attention_launch(D, widths, f32, kind)
                row[kind] = None if launch is None else {"rows": launch[0], "partials_in_smem": launch[1],
                                                         "bytes": launch[2]}
            rows.append(row)
    return rows


def markdown(kernels: list[dict], launches: list[dict], meta: dict) -> str:
    lines = [f"# CUDA kernels (csrc/cuda) compiled for sm_{meta['arch']}", "",
             f"nvcc {meta['nvcc']}, torch {meta['torch']}, git {meta['git']}. Registers per thread, spills and stack "
             "frame in bytes (ptxas -v); every block is 256 threads, the attention forward and statistics kernels "
             "bounded for 2 blocks an SM and the backward for 1 (`__launch_bounds__`). Products: wmma (tensor cores, "
             "float32 accumulation) for bfloat16/float16, a float32 SIMT loop for float32.", "",
             "| file | kernel | dtype | registers | spill stores | spill loads | stack | static smem | barriers |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in kernels:
        lines.append(f"| {r['file']} | `{r['kernel']}` | {r['dtype']} | {r.get('registers', '?')} | "
                     f"{r.get('spill_stores', '?')} | {r.get('spill_loads', '?')} | {r.get('stack', '?')} | "
                     f"{r.get('static_smem', '?')} | {r.get('barriers', '?')} |")
    lines += ["", "Dynamic shared memory of the attention kernels' launches on an sm_90 GPU (227 KB a block): rows a "
              "tile, partial sums of the backward in shared (smem) or global memory, bytes.", "",
              "| D | hidden | dtype | forward | Dice statistics | backward |", "| ---: | --- | --- | --- | --- | --- |"]

    def cell(x):
        if x is None:
            return "does not fit"
        where = ", partials in smem" if x["partials_in_smem"] else ""
        return f"{x['rows']} rows{where}: {x['bytes']} B"

    for r in launches:
        lines.append(f"| {r['D']} | {tuple(r['hidden'])} | {r['dtype']} | {cell(r['fwd'])} | {cell(r['stats'])} | "
                     f"{cell(r['bwd'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--out", help="JSON lines file (a markdown table is written next to it)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    args = parser.parse_args()
    if torch.version.cuda is None:
        print("compile_check_cuda: needs a CUDA build of torch (its headers)", file=sys.stderr)
        return 2
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    meta = {"arch": args.arch, "torch": torch.__version__,
            "nvcc": (re.findall(r"release ([\d.]+)", nvcc.stdout) or ["?"])[0], "git": git.stdout.strip() or "?"}
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    kernels, failed = [], False
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for source, (rows, seconds, error) in zip(sources, pool.map(lambda s: compile_file(s, args.arch, tmp),
                                                                     sources)):
            name = os.path.relpath(source, ROOT)
            if error:
                failed = True
                print(f"{name}: compile error after {seconds:.0f} s\n{error}", file=sys.stderr)
                continue
            print(f"{name}: {len(rows)} kernels in {seconds:.0f} s")
            for r in rows:
                r["file"] = os.path.basename(source)
                kernels.append(r)
                print(f"  {r['kernel']:<32} {r['dtype']:<9} {r.get('registers', '?'):>3} regs  "
                      f"{r.get('spill_stores', '?')} B spilled  {r.get('stack', '?')} B stack  "
                      f"{r.get('static_smem', '?')} B static smem")
    kernels.sort(key=lambda r: (r["file"], r["kernel"], r["dtype"]))
    launches = launch_rows()
    if args.out:
        with open(args.out, "w") as f:
            for r in kernels:
                f.write(json.dumps({"kind": "kernel", **meta, **{k: v for k, v in r.items() if k != "mangled"}}) + "\n")
            for r in launches:
                f.write(json.dumps({"kind": "launch", **meta, **r}) + "\n")
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(kernels, launches, meta))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
