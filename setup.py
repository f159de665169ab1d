"""Build chunkinfer's C++/CUDA core with torch.utils.cpp_extension.

Whether the CUDA part is built is decided by CHUNKINFER_CUDA and the toolkit found on disk, never by
torch.cuda.is_available(): CI has nvcc and no GPU and must still compile the kernels.
  CHUNKINFER_CUDA=auto (default)  build CUDA when a toolkit is found and torch is a CUDA build
  CHUNKINFER_CUDA=1               require it (fail loudly if it cannot be built)
  CHUNKINFER_CUDA=0               CPU part only
TORCH_CUDA_ARCH_LIST overrides the default target, 9.0a (H100/H200). MAX_JOBS sets ninja's jobs.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _load_toolkit_module():
    spec = importlib.util.spec_from_file_location("_ci_toolkit", ROOT / "python/chunkinfer/tools/toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_sources() -> dict[str, list[str]]:
    sources: dict[str, list[str]] = {"cpu": [], "python": [], "cuda": []}
    for line in (ROOT / "csrc/sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            kind, path = line.split()
            sources[kind].append(path)
    return sources


def decide_cuda() -> str | None:
    """The CUDA toolkit root to build against, or None for a CPU-only build."""
    switch = os.environ.get("CHUNKINFER_CUDA", "auto").lower()
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"CHUNKINFER_CUDA must be auto, 0 or 1, got {switch!r}")
    if switch == "0":
        return None
    import torch  # noqa: F401  (its CUDA version decides whether CUDA kernels can link)

    cuda_home = _load_toolkit_module().find_cuda_home()
    reason = None
    if cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME to the directory with bin/nvcc and lib64/libcudart)"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    if reason:
        if switch == "1":
            raise SystemExit(f"CHUNKINFER_CUDA=1 but the CUDA part cannot be built: {reason}")
        print(f"chunkinfer: building the CPU part only: {reason}")
        return None
    return cuda_home


def extension_modules():
    cuda_home = decide_cuda()
    if cuda_home:
        # Must precede the import of cpp_extension, which reads CUDA_HOME once at import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    from torch.utils import cpp_extension

    sources = read_sources()
    cxx = ["-O3", "-fopenmp"]
    defines = [("TORCH_EXTENSION_NAME", "_C")]
    if not cuda_home:
        ext = cpp_extension.CppExtension(
            "chunkinfer._C", sources["cpu"] + sources["python"], extra_compile_args={"cxx": cxx},
            define_macros=defines, extra_link_args=["-fopenmp"],
        )
        return [ext], cpp_extension
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines += [("CHUNKINFER_WITH_CUDA", "1"), ("CHUNKINFER_CUDA_ARCHS", f'"{archs}"')]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    ext = cpp_extension.CUDAExtension(
        "chunkinfer._C", sources["cpu"] + sources["python"] + sources["cuda"],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, define_macros=defines,
        extra_link_args=["-fopenmp"],
    )
    return [ext], cpp_extension


ext_modules, cpp_extension = extension_modules()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
