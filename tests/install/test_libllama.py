"""native/libllama.py's decisions, on files made in the test (no build)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from support.daemons import ROOT


def _libllama() -> ModuleType:
    spec = importlib.util.spec_from_file_location("libllama", ROOT / "native" / "libllama.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("libllama", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_a_gpu_builds_backend_is_copied_beside_the_binding(tmp_path: Path) -> None:
    """libggml.so links its backends directly: a CUDA build's libggml-cuda.so must travel
    with libllama into fse/_libs, or the binding cannot load there."""
    names = [
        "libllama.so",
        "libllama.so.0",
        "libggml.so",
        "libggml-base.so",
        "libggml-cpu.so",
        "libggml-cuda.so",
        "libggml-vulkan.so",
        "libmtmd.so",  # llama.cpp's multimodal library: not needed
        "llama.pc",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    lib = _libllama().LlamaLib([tmp_path], tmp_path, "test")
    assert [p.name for p in lib.shared_libraries()] == sorted(
        n for n in names if n.startswith(("libllama", "libggml"))
    )
