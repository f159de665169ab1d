"""What was built: a machine with a CUDA toolkit and a CUDA torch must produce CUDA kernels."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import chunkinfer
from chunkinfer import ops
from chunkinfer.tools import toolkit

OPS = list(ops.library.SCHEMAS)


def test_compiled_module_loaded():
    info = chunkinfer.build_info()
    assert info["compiled"], f"the compiled extension did not load: {info['load_error']}"
    assert info["cpu_kernels"]
    for name in OPS:
        assert ops.has_kernel(name, "CPU"), f"{name} has no CPU kernel"


def test_cuda_kernels_built_wherever_nvcc_is():
    """A silent CPU-only build cannot pass where the toolkit and a CUDA torch are present."""
    if os.environ.get("CHUNKINFER_CUDA") == "0":
        pytest.skip("CPU-only build requested with CHUNKINFER_CUDA=0")
    if toolkit.find_cuda_home() is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit or a CPU-only torch: a CPU-only build is expected here")
    info = chunkinfer.build_info()
    assert info["cuda"], f"nvcc is present but the extension was built without CUDA: {info}"
    for name in OPS:
        assert ops.has_kernel(name, "CUDA") != (name in ops.library.HOST_ONLY_OPS), \
            f"{name}: {'a host-only op with' if name in ops.library.HOST_ONLY_OPS else 'no'} CUDA kernel"


def test_cuda_binary_holds_the_requested_architectures():
    info = chunkinfer.build_info()
    if not info["cuda"]:
        pytest.skip("CPU-only build")
    home = toolkit.find_cuda_home()
    cuobjdump = shutil.which("cuobjdump") or (home and str(Path(home) / "bin" / "cuobjdump"))
    if not cuobjdump or not Path(cuobjdump).exists():
        pytest.skip("cuobjdump not available")
    listing = subprocess.run([cuobjdump, "--list-elf", chunkinfer.ops.library.extension.__file__],
                             capture_output=True, text=True, check=True).stdout
    for arch in info["cuda_archs"].replace(",", ";").split(";"):
        sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
        assert sm in listing, f"{sm} missing from the extension's cubins:\n{listing}"


def test_python_schemas_equal_the_registered_ones():
    for name, schema in ops.library.SCHEMAS.items():
        registered = getattr(torch.ops.chunkinfer, name).default._schema
        assert registered == torch._C.parse_schema("chunkinfer::" + schema), f"{name}: C++ has {registered}"


def test_find_cuda_home_sees_through_a_wrapper(tmp_path, monkeypatch):
    real = toolkit.find_cuda_home()
    if real is None:
        pytest.skip("no CUDA toolkit on this machine")
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}:{os.environ['PATH']}")
    assert toolkit.find_cuda_home() == real
    assert not toolkit.is_cuda_toolkit(tmp_path)


def test_explicit_cuda_home_that_is_not_a_toolkit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="is not a CUDA toolkit"):
        toolkit.find_cuda_home()
