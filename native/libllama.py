"""Find libllama, or build it once from the pinned llama.cpp source, and cache the build.

Order of preference:
  1. ``LLAMA_CPP_DIR``: an install prefix or a llama.cpp build tree the user points at;
  2. ``pkg-config llama``: a system-wide llama.cpp;
  3. the llama.cpp source that the PyPI sdist ``llama-cpp-python==0.3.36`` vendors,
     downloaded with pip, checked against its sha256, and built (target ``llama`` only)
     into ``$FSE_CACHE_DIR/llama.cpp-<sha>/``, so every clone on this machine reuses it.
     With CUDA's compiler on the machine (``CUDACXX``, ``nvcc`` on PATH, or
     /usr/local/cuda) it is built with ggml's CUDA backend, for the installed GPUs'
     architectures; ``FSE_LLAMA_CMAKE_ARGS`` adds cmake flags of the user's (another
     backend: ``-DGGML_VULKAN=ON``, ``-DGGML_HIP=ON``; ``-DGGML_CUDA=OFF`` for a CPU
     build beside nvcc). Any build but the plain CPU one lives in a directory of its own,
     ``llama.cpp-<sha>-<backend>-<flags hash>``, so a CPU and a CUDA build sit side by side.

Run as a script to print what was found (``--tools`` also builds llama-bench and
llama-batched-bench for the benchmarks and prints their directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp"

# Only the shared library: no curl (we never download models through llama.cpp), no tools,
# no tests. GGML_NATIVE tunes ggml for this CPU, as a local build of llama.cpp does by default.
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=ON",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    # Tools are configured (the benchmarks build llama-bench, llama-batched-bench and
    # llama-server from this same tree) but only the targets asked for are ever compiled;
    # llama-server without its web UI, which would be downloaded.
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    # The libraries find each other next to themselves wherever they are copied.
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    # ggml's RPC backend (docs/rpc.md): linked into libggml (GGML_BACKEND_DL is off), so
    # ggml_backend_reg_by_name("RPC") finds it; `fse rpc-worker` serves a host's devices
    # with it and `fse serve --rpc` splits a model's layers across such workers.
    "-DGGML_RPC=ON",
    # RDMA transport off: libibverbs on a build machine would otherwise become a
    # dependency of the copied libggml-rpc.so on every machine it runs on.
    "-DGGML_RPC_RDMA=OFF",
]
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")
# The GGML backend flags this script knows by name (the build directory says which).
BACKENDS = {"-DGGML_CUDA=ON": "cuda", "-DGGML_VULKAN=ON": "vulkan", "-DGGML_HIP=ON": "hip"}


class LlamaNotFound(RuntimeError):
    """libllama could not be found or built; the message says why and what to do."""


@dataclass(frozen=True)
class LlamaLib:
    include_dirs: list[Path]  # llama.h and the ggml headers it includes
    lib_dir: Path  # libllama.so and its libggml*.so siblings
    origin: str  # human-readable: where it came from

    def shared_libraries(self) -> list[Path]:
        """libllama and the ggml libraries it needs, real files and soname links: every
        libggml* there, so a GPU build's backend (libggml-cuda.so, -vulkan, -hip) comes too."""
        names = ("libllama.so", "libggml")
        return sorted(p for p in self.lib_dir.iterdir() if p.name.startswith(names))


def log(message: str) -> None:
    print(f"[libllama] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """$FSE_CACHE_DIR, else $XDG_CACHE_HOME/fse, else ~/.cache/fse.

    Same rule as fse.core.gguf.cache_dir: this script runs before the package is built,
    so it cannot import it."""
    if env := os.environ.get("FSE_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "fse"


@dataclass(frozen=True)
class Backend:
    """What the pinned llama.cpp is built for: a name and the cmake flags beyond
    CMAKE_OPTIONS (none for the plain CPU build)."""

    name: str
    flags: tuple[str, ...]


def cuda_compiler(env: dict[str, str], which: Any = shutil.which) -> str | None:
    """CUDA's compiler: $CUDACXX, nvcc on PATH, or the toolkit's default place."""
    for candidate in (env.get("CUDACXX"), "nvcc", "/usr/local/cuda/bin/nvcc"):
        if candidate and (found := which(candidate)):
            return str(found)
    return None


def cuda_architectures(run: Any = subprocess.run) -> str:
    """The installed GPUs' compute capabilities as CMAKE_CUDA_ARCHITECTURES ("90" for an
    H200; "80;90" for two kinds), from nvidia-smi; "native" (cmake asks the driver) when
    nvidia-smi cannot say."""
    try:
        out = run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "native"
    caps = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
    return ";".join(caps) if caps and all(c.isdigit() for c in caps) else "native"


def choose_backend(
    env: dict[str, str], which: Any = shutil.which, run: Any = subprocess.run
) -> Backend:
    """CUDA when its compiler is here (unless FSE_LLAMA_CMAKE_ARGS turns it off or picks
    another backend), else the CPU; FSE_LLAMA_CMAKE_ARGS is added as given, last."""
    extra = tuple(shlex.split(env.get("FSE_LLAMA_CMAKE_ARGS", "")))
    chosen = [BACKENDS[f] for f in extra if f in BACKENDS]
    asked_cuda_off = "-DGGML_CUDA=OFF" in extra
    nvcc = None if chosen or asked_cuda_off else cuda_compiler(env, which)
    flags: tuple[str, ...] = ()
    if nvcc is not None:
        flags = ("-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if not any(f.startswith("-DCMAKE_CUDA_ARCHITECTURES=") for f in extra):
            flags += (f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures(run)}",)
        chosen = ["cuda"]
    return Backend(chosen[0] if chosen else "cpu", flags + extra)


def options_key() -> str:
    """CMAKE_OPTIONS' digest, part of every build directory's name: a change of the base
    flags (GGML_RPC added) builds once into a new directory rather than reusing a tree
    configured without it."""
    return hashlib.sha256("\0".join(CMAKE_OPTIONS).encode()).hexdigest()[:8]


def build_root(backend: Backend | None = None) -> Path:
    """The cached build of the pinned source for `backend` (the machine's by default)."""
    backend = backend or choose_backend(dict(os.environ))
    name = f"llama.cpp-{SDIST_SHA256[:16]}-{options_key()}"
    if backend.flags:
        digest = hashlib.sha256("\0".join(backend.flags).encode()).hexdigest()[:8]
        name += f"-{backend.name}-{digest}"
    return cache_root() / name


def from_llama_cpp_dir(root: Path) -> LlamaLib:
    """An install prefix (include/, lib/) or a source tree built in build/."""
    header_dirs = [root / "include", root / "ggml" / "include"]
    include_dirs = [d for d in header_dirs if d.is_dir()]
    if not any((d / "llama.h").is_file() for d in include_dirs):
        raise LlamaNotFound(f"LLAMA_CPP_DIR={root}: no include/llama.h under it")
    for candidate in ("lib", "lib64", "build/bin", "build/src"):
        lib_dir = root / candidate
        if (lib_dir / "libllama.so").exists():
            return LlamaLib(include_dirs, lib_dir, f"LLAMA_CPP_DIR={root}")
    raise LlamaNotFound(
        f"LLAMA_CPP_DIR={root}: no libllama.so in lib/, lib64/, build/bin/ or build/src/"
    )


def from_pkg_config() -> LlamaLib | None:
    if shutil.which("pkg-config") is None:
        return None
    probe = subprocess.run(["pkg-config", "--exists", "llama"], check=False)
    if probe.returncode != 0:
        return None

    def variable(name: str) -> str:
        return subprocess.run(
            ["pkg-config", f"--variable={name}", "llama"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    version = subprocess.run(
        ["pkg-config", "--modversion", "llama"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return LlamaLib(
        [Path(variable("includedir"))], Path(variable("libdir")), f"pkg-config llama {version}"
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_source(root: Path) -> Path:
    """Download the sdist with pip, check its sha256, unpack llama.cpp into root/src."""
    source = root / "src"
    if (source / "CMakeLists.txt").is_file():
        return source
    root.mkdir(parents=True, exist_ok=True)
    # Another build of the same pinned source (other flags) already unpacked it, after
    # checking the sdist's sha256: copy that rather than download it again.
    for sibling in sorted(root.parent.glob(f"llama.cpp-{SDIST_SHA256[:16]}*/src")):
        if sibling != source and (sibling / "CMakeLists.txt").is_file():
            log(f"copying the pinned source from {sibling}")
            partial = root / "src.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(sibling, partial, symlinks=True)
            partial.rename(source)
            return source
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        log(f"downloading {SDIST} (sdist) with pip")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                SDIST,
            ],
            check=True,
        )
        sdist = Path(tmp) / SDIST_FILE
        actual = sha256_of(sdist)
        if actual != SDIST_SHA256:
            raise LlamaNotFound(
                f"{SDIST_FILE}: sha256 {actual} does not match the pinned {SDIST_SHA256}; "
                "refusing to build unverified source"
            )
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDOR_DIR + "/")]
            tar.extractall(tmp, members=members, filter="data")
        vendored = Path(tmp, VENDOR_DIR)
        # The sdist keeps llama.cpp's submodule gitfile, pointing at a .git that is not
        # shipped; cmake would ask git about it and warn. This is plain source now.
        (vendored / ".git").unlink(missing_ok=True)
        vendored.rename(source)
    return source


def cmake_build(root: Path, targets: list[str]) -> Path:
    source = fetch_source(root)
    build = root / "build"
    cache = build / "CMakeCache.txt"
    # A tree configured before llama-server was one of the tools is configured again
    # (same options otherwise: nothing already built is rebuilt).
    if not cache.is_file() or "LLAMA_BUILD_SERVER:BOOL=ON" not in cache.read_text():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(
            [
                "cmake",
                "-S",
                str(source),
                "-B",
                str(build),
                *generator,
                *CMAKE_OPTIONS,
                *choose_backend(dict(os.environ)).flags,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    jobs = str(os.cpu_count() or 2)
    log(f"building {' '.join(targets)} with cmake (-j{jobs}); this takes a few minutes once")
    subprocess.run(
        ["cmake", "--build", str(build), "--target", *targets, "-j", jobs],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return build / "bin"


def from_cache_or_build() -> LlamaLib:
    root = build_root()
    prefix = root / "prefix"
    if (prefix / "lib" / "libllama.so").exists() and (prefix / "include" / "llama.h").exists():
        return LlamaLib([prefix / "include"], prefix / "lib", f"cached build in {prefix}")
    if shutil.which("cmake") is None:
        raise LlamaNotFound(
            "libllama not found (set LLAMA_CPP_DIR or install llama.cpp with pkg-config), "
            "and cmake is missing to build it"
        )
    bin_dir = cmake_build(root, ["llama"])
    # Install into a staging prefix, then rename: a half-copied prefix is never mistaken
    # for a finished one.
    staging = root / "prefix.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "include").mkdir(parents=True)
    (staging / "lib").mkdir()
    source = root / "src"
    for header in [source / "include" / "llama.h", *(source / "ggml" / "include").glob("*.h")]:
        shutil.copy2(header, staging / "include")
    for lib in bin_dir.iterdir():
        if lib.name.startswith(("libllama.so", "libggml")):
            shutil.copy2(lib, staging / "lib", follow_symlinks=False)
    shutil.rmtree(prefix, ignore_errors=True)
    staging.rename(prefix)
    return LlamaLib([prefix / "include"], prefix / "lib", f"built from {SDIST} into {prefix}")


def locate() -> LlamaLib:
    if env := os.environ.get("LLAMA_CPP_DIR"):
        return from_llama_cpp_dir(Path(env).expanduser().resolve())
    return from_pkg_config() or from_cache_or_build()


def tools_dir() -> Path:
    """Directory holding llama-bench, llama-batched-bench and llama-server (built on
    first use)."""
    if all(shutil.which(t) for t in TOOLS) and os.environ.get("LLAMA_CPP_DIR") is None:
        return Path(shutil.which(TOOLS[0]) or "").parent
    if env := os.environ.get("LLAMA_CPP_DIR"):
        for candidate in ("bin", "build/bin"):
            directory = Path(env) / candidate
            if all((directory / t).exists() for t in TOOLS):
                return directory
    root = build_root()
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    return cmake_build(root, list(TOOLS))


def prepare_build(lib: LlamaLib) -> None:
    """Hand the found libllama to the cffi build (native/build_native.py), which only reads."""
    root = Path(__file__).resolve().parent.parent
    package_libs = root / "daemon" / "fse" / "_libs"
    shutil.rmtree(package_libs, ignore_errors=True)
    package_libs.mkdir(parents=True)
    for path in lib.shared_libraries():
        shutil.copy2(path, package_libs, follow_symlinks=False)
    record = root / "build" / "libllama.json"
    record.parent.mkdir(exist_ok=True)
    doc = {"include_dirs": [str(d) for d in lib.include_dirs], "origin": lib.origin}
    record.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", action="store_true", help="print the llama.cpp tools dir")
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="also copy the libraries into daemon/fse/_libs and record llama.h's location "
        "in build/libllama.json for the cffi build",
    )
    args = parser.parse_args()
    try:
        if args.tools:
            print(tools_dir())
        else:
            lib = locate()
            print(f"libllama: {lib.origin}")
            if args.prepare:
                prepare_build(lib)
    except (LlamaNotFound, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
