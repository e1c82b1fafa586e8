"""native/libllama.py's decisions, on files made in the test (no build)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
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


def _which(found: dict[str, str]) -> Callable[[str], str | None]:
    return found.get


def _smi(out: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, out, "")

    return run


def test_the_build_is_for_the_backend_the_machine_has() -> None:
    lib = _libllama()
    plain = lib.build_root(lib.Backend("cpu", ()))
    # No CUDA compiler: the CPU build, in the directory every clone already shares.
    cpu = lib.choose_backend({}, _which({}))
    assert (cpu.name, cpu.flags) == ("cpu", ())
    # The base flags are part of the name: adding one (GGML_RPC) builds anew, once.
    assert plain.name == f"llama.cpp-{lib.SDIST_SHA256[:16]}-{lib.options_key()}"
    assert "-DGGML_RPC=ON" in lib.CMAKE_OPTIONS
    # nvcc on PATH: CUDA, for the installed GPUs' architectures, in a directory of its own.
    nvcc = "/opt/cuda/bin/nvcc"
    cuda = lib.choose_backend({}, _which({"nvcc": nvcc}), _smi("9.0\n9.0\n8.6\n"))
    assert cuda == lib.Backend(
        "cuda",
        ("-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=86;90"),
    )
    assert lib.build_root(cuda).name.startswith(plain.name + "-cuda-")
    # nvidia-smi that cannot say: cmake's "native".
    assert lib.choose_backend({}, _which({"nvcc": nvcc}), _smi("")).flags[-1] == (
        "-DCMAKE_CUDA_ARCHITECTURES=native"
    )
    # The user's flags come last and win: CUDA off beside nvcc, another backend, an arch.
    off = lib.choose_backend({"FSE_LLAMA_CMAKE_ARGS": "-DGGML_CUDA=OFF"}, _which({"nvcc": nvcc}))
    assert off == lib.Backend("cpu", ("-DGGML_CUDA=OFF",))
    assert lib.build_root(off) != plain  # any flag makes its own build
    vulkan = lib.choose_backend(
        {"FSE_LLAMA_CMAKE_ARGS": "-DGGML_VULKAN=ON"}, _which({"nvcc": nvcc})
    )
    assert vulkan == lib.Backend("vulkan", ("-DGGML_VULKAN=ON",))
    arch = lib.choose_backend(
        {"FSE_LLAMA_CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=90"}, _which({"nvcc": nvcc})
    )
    assert arch.flags == (
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        "-DCMAKE_CUDA_ARCHITECTURES=90",
    )
    # $CUDACXX names the compiler when nvcc is not on PATH.
    toolkit = "/usr/local/cuda-12/bin/nvcc"
    named = lib.choose_backend({"CUDACXX": toolkit}, _which({toolkit: toolkit}), _smi("9.0"))
    assert named.flags[1] == f"-DCMAKE_CUDA_COMPILER={toolkit}"
