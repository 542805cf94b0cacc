"""Running the runtime on an emulated ARM64 CPU (the phones' CPU) on this x86 machine.

ONNX Runtime's arm64 build runs its ARM kernels (MLAS NEON, dot-product and i8mm paths) that an
x86 host never executes. An arm64 userland runs them under QEMU's user-mode emulation:

- QEMU 10 (Debian trixie's qemu-user, a static binary unpacked with dpkg -x). bookworm's QEMU 7.2
  makes `import onnxruntime` crash: ORT reads the host's x86 /proc/cpuinfo.
- an arm64 Python 3.11 from Debian (mmdebstrap --variant=extract: unpacked, nothing run, ~10 s).
- onnxruntime, numpy, tokenizers and rich as aarch64 wheels from PyPI (pip --target --platform).

All of it is set up on first use in the cache (about 200 MB, under a minute) and reused. The
emulated process imports this package from its source folder, torch-free: it checks an export
against a golden file of the reference's logits saved on the host.

A .pte runs in our native runner (gemma_edge/native/), cross-compiled with Debian's
aarch64-linux-gnu-g++ against the executorch aarch64 wheel's runtime, optimized and quantized
kernels and XNNPACK delegate (libexecutorch*.so and headers; its Python binding needs libtorch,
which has no usable aarch64 CPU wheel). The host process drives it under QEMU
(runtime/native_backend.py), so the reference and the checks stay on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from gemma_edge.errors import GemmaEdgeError
from gemma_edge.files import exclusive, write_atomic
from gemma_edge.native_build import build_runner, runner_path

# NEON, dot product and fp16, as in most phones since 2019 (Cortex-A76). neoverse-n2 adds i8mm.
DEFAULT_CPU = "cortex-a76"
CPUS = ("cortex-a76", "neoverse-n2")
SUITE = "bookworm"  # the userland; its python3.11 matches the wheels' ABI
QEMU_SUITE = "trixie"  # QEMU 10
PACKAGES = ("onnxruntime", "numpy", "tokenizers", "rich")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
CROSS_CXX = "aarch64-linux-gnu-g++"


def arm64_dir() -> Path:
    from gemma_edge.checkpoints import cache_dir

    return cache_dir() / "arm64"


def ensure_arm64(progress=print) -> Path:
    """The emulation kit (qemu/, root/, site/ under one folder), set up once."""
    base = arm64_dir()
    if (base / "ready").is_file():
        return base
    base.mkdir(parents=True, exist_ok=True)
    for tool in ("apt-get", "dpkg", "mmdebstrap"):
        if shutil.which(tool) is None:
            raise GemmaEdgeError(f"emulating arm64 needs {tool} (Debian): apt-get install mmdebstrap")
    with exclusive(base / ".setup.lock"):  # two first uses at once: the second waits for the first's kit
        if (base / "ready").is_file():
            return base
        progress(f"setting up the arm64 emulation in {base} (once)")
        _qemu(base)
        _userland(base)
        _wheels(base)
        # Last, and whole: a kit without it (a killed setup) is completed step by step on the next use;
        # each step's folder appears by a rename once complete, so no half-made step is ever taken as done.
        write_atomic(base / "ready", "qemu-user from trixie, python3.11 from bookworm arm64, " + ", ".join(PACKAGES) + "\n")
    return base


def _qemu(base: Path) -> None:
    if (base / "qemu" / "usr" / "bin" / "qemu-aarch64").is_file():
        return
    apt = base / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb http://deb.debian.org/debian {QEMU_SUITE} main\n")
    options = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
               "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
               "-o", "APT::Sandbox::User=root"]
    _run(["apt-get", *options, "update", "-qq"], "downloading Debian trixie's package lists")
    _run(["apt-get", *options, "download", "qemu-user"], "downloading qemu-user", cwd=apt)
    deb = next(apt.glob("qemu-user_*.deb"))
    tmp = base / "qemu.partial"  # unpacked here, then renamed: a killed run leaves no half a QEMU in use
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["dpkg", "-x", str(deb), str(tmp)], "unpacking qemu-user")
    shutil.rmtree(base / "qemu", ignore_errors=True)
    tmp.rename(base / "qemu")
    deb.unlink()


def _userland(base: Path) -> None:
    if (base / "root" / "usr" / "bin" / "python3.11").is_file():
        return
    tmp = base / "root.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["mmdebstrap", "--quiet", "--arch=arm64", "--variant=extract",
          "--include=python3.11-minimal,libpython3.11-stdlib,libstdc++6", SUITE, str(tmp)], "unpacking an arm64 Python")
    tmp.rename(base / "root")


def _wheels(base: Path) -> None:
    tmp = base / "site.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tmp), *platforms, "--python-version", "3.11",
          "--only-binary=:all:", *PACKAGES], "downloading aarch64 wheels")
    shutil.rmtree(base / "site", ignore_errors=True)
    tmp.rename(base / "site")


def ensure_pte_runner(progress=print) -> Path:
    """The native .pte runner for arm64 (bin/gemma-edge-runner-* in the kit), built once per
    executorch version and runner source (native_build.py)."""
    from importlib.metadata import version

    base = ensure_arm64(progress)
    et_version = version("executorch")  # the runtime must read what this exporter writes
    runner = runner_path(base / "bin", et_version)
    if runner.is_file():
        return runner
    if shutil.which(CROSS_CXX) is None:
        raise GemmaEdgeError(f"building the arm64 .pte runner needs {CROSS_CXX}: apt-get install g++-aarch64-linux-gnu")
    with exclusive(base / ".wheel.lock"):  # another process may be unpacking it
        et = _executorch_wheel(base, et_version, progress)
    return build_runner(CROSS_CXX, et, runner, progress, "for arm64")


def _executorch_wheel(base: Path, et_version: str, progress) -> Path:
    """lib/ and include/ of the executorch aarch64 wheel of this version, unpacked once."""
    import zipfile

    target = base / f"executorch-{et_version}"
    if (target / "lib" / "libexecutorch.so").is_file():
        return target
    progress(f"downloading the executorch {et_version} aarch64 wheel (its native runtime)")
    download = base / "wheels"
    shutil.rmtree(download, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(download),
          "--platform", PLATFORMS[0], "--python-version", "3.11", "--only-binary=:all:", f"executorch=={et_version}"],
         "downloading the executorch aarch64 wheel")
    tmp = base / f"executorch-{et_version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(next(download.glob("executorch-*.whl"))) as wheel:
        for name in wheel.namelist():
            if name.startswith(("executorch/lib/", "executorch/include/")) and not name.endswith("/"):
                wheel.extract(name, tmp)
    (tmp / "executorch").rename(target)
    shutil.rmtree(tmp)
    shutil.rmtree(download)
    return target


def arm64_command(cpu: str = DEFAULT_CPU) -> tuple[list[str], dict[str, str]]:
    """The prefix that runs an arm64 program of the kit under QEMU, and its environment."""
    if cpu not in CPUS:
        raise GemmaEdgeError(f"unknown emulated CPU {cpu!r}; valid: {', '.join(CPUS)}")
    base = ensure_arm64()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QEMU_CPU": cpu, "HOME": os.environ.get("HOME", "/tmp")}
    return [str(base / "qemu" / "usr" / "bin" / "qemu-aarch64"), "-L", str(base / "root")], env


def run_arm64(argv: list[str], cpu: str = DEFAULT_CPU, timeout: float = 3600) -> subprocess.CompletedProcess:
    """`gemma-edge <argv>` in the emulated arm64 Python (output passed through, not captured)."""
    prefix, env = arm64_command(cpu)
    base = arm64_dir()
    source = Path(__file__).resolve().parents[1]  # the folder holding the gemma_edge package
    script = (f"import sys; sys.path[:0] = [{str(base / 'site')!r}, {str(source)!r}]; "
              "from gemma_edge.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([*prefix, str(base / "root" / "usr" / "bin" / "python3.11"), "-c", script, *argv], env=env, timeout=timeout)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise GemmaEdgeError(f"{what} failed ({' '.join(cmd[:2])} ...): {result.stderr.strip()[-500:]}")
