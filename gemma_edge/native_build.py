"""Building gemma-edge's native .pte runner (gemma_edge/native/) against an executorch wheel's runtime
(its libexecutorch*.so and headers, which the wheels ship under executorch/lib and executorch/include):

- for this machine, from the installed executorch package (host_runner): `--runtime native`, a .pte
  run without torch and with XNNPACK's weight cache (runtime/native_backend.py);
- for arm64, cross-compiled from the aarch64 wheel (emulation.py): the emulated parity check.

Each build is made once per executorch version and runner source, in the cache, and written
through a temporary file (a build killed halfway is redone, never used).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from gemma_edge.errors import GemmaEdgeError, MissingDependencyError
from gemma_edge.files import exclusive

SOURCE = Path(__file__).with_name("native")
NATIVE_SOURCES = ("pte_program.cpp", "runner_main.cpp", "pte_program.h")
# What executorch's CMake config gives its consumers: the vendored c10 headers without PyTorch's
# generated cmake_macros.h, and the class layouts the shipped libraries were compiled with.
ET_DEFINES = ("C10_USING_CUSTOM_GENERATED_MACROS", "ET_EVENT_TRACER_ENABLED", "ET_USE_THREADPOOL")
# Linked whether or not the runner names a symbol of theirs: their static initializers register the
# kernels (optimized + portable, quantized embeddings) and the XNNPACK delegate.
ET_LIBS = ("executorch_kernels_optimized", "executorch_kernels_quantized", "executorch_backend_xnnpack",
           "executorch_threadpool", "executorch")


def runner_path(folder: Path, et_version: str) -> Path:
    """Where the runner built from this source against executorch et_version lives in folder."""
    digest = hashlib.sha256(et_version.encode() + b"".join((SOURCE / f).read_bytes() for f in NATIVE_SOURCES)).hexdigest()[:16]
    return folder / f"gemma-edge-runner-{digest}"


def build_runner(cxx: str, et: Path, runner: Path, progress, what: str) -> Path:
    """runner, compiled with cxx against the executorch runtime in et (lib/, include/) unless it is
    there already; one process at a time, earlier builds (other versions) removed."""
    if runner.is_file():
        return runner
    with exclusive(runner.parent / ".runner.lock"):  # another process may be building the same one
        if runner.is_file():
            return runner
        progress(f"compiling the native .pte runner {what}")
        tmp = runner.with_suffix(".partial")
        command = [cxx, "-std=c++17", "-O2", "-Wno-deprecated-declarations", *(f"-D{d}" for d in ET_DEFINES),
                   f"-I{et / 'include'}", f"-I{et / 'include/executorch/runtime/core/portable_type/c10'}",
                   "-o", str(tmp), *(str(SOURCE / f) for f in NATIVE_SOURCES if f.endswith(".cpp")),
                   f"-L{et / 'lib'}", "-Wl,--no-as-needed", *(f"-l{lib}" for lib in ET_LIBS), f"-Wl,-rpath,{et / 'lib'}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise GemmaEdgeError(f"compiling the native .pte runner {what} failed ({cxx} ...): {result.stderr.strip()[-500:]}")
        for old in runner.parent.glob("gemma-edge-runner-*"):  # other versions' builds
            if old != tmp:
                old.unlink()
        tmp.rename(runner)
    return runner


def host_runner(progress=print) -> Path:
    """The native runner for this machine, built on first use (a few seconds) against the installed
    executorch package, with $CXX or c++."""
    import importlib.util
    from importlib.metadata import version

    from gemma_edge.checkpoints import cache_dir

    spec = importlib.util.find_spec("executorch")
    et = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if et is None or not (et / "lib" / "libexecutorch.so").is_file() or not (et / "include").is_dir():
        raise MissingDependencyError("the native runner builds against executorch's runtime libraries: "
                                     "pip install executorch==1.5.1 (or use --runtime python)")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise MissingDependencyError("building the native runner needs a C++17 compiler: apt-get install g++ "
                                     "(or set CXX; or use --runtime python)")
    return build_runner(cxx, et, runner_path(cache_dir() / "native", version("executorch")), progress, "for this machine")
