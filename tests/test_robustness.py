"""Nothing lost, nothing loaded that should not be: --overwrite, interrupted and killed exports, a full
or read-only disk, damaged and hostile files, bad arguments, long runs and threads.

Through the real CLI (in this process where that is enough, a child process where a signal is the
point): bad input exits 2 with one line on stderr and no traceback; a failed check exits 1.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gemma_edge
from gemma_edge import native_build
from gemma_edge.cli import main
from gemma_edge.errors import (CheckpointError, ConcurrentUseError, DamagedExportError, MissingDependencyError,
                               OutputFolderError, UnsafeManifestError)
from gemma_edge.manifest import MANIFEST

MAX_SEQ_LEN = 64  # conftest.TINY_MAX_SEQ_LEN: the cached tiny exports'


@pytest.fixture(scope="module")
def ckpt(tiny_with_tokenizers) -> Path:
    return tiny_with_tokenizers["tiny-gemma3"]


@pytest.fixture(scope="module")
def earlier(tiny_exports) -> dict[str, Path]:
    """The cached tiny-gemma3 fp32 exports (copy before changing them), and the native runner that
    runs the .pte built: on a fresh cache the first `generate` would print "compiling the native .pte
    runner" before the one line of error a test checks (seen on a cold cache, this module alone)."""
    with contextlib.suppress(MissingDependencyError):  # no compiler: --runtime auto takes the Python one
        native_build.host_runner(lambda message: None)
    return {fmt: tiny_exports("tiny-gemma3", fmt, "fp32") for fmt in ("onnx", "pte")}


def cli(capsys, *argv: str) -> tuple[int, str]:
    """gemma-edge ARGV in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-edge: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------
# --overwrite replaces only an earlier export

def test_overwrite_refuses_a_folder_that_is_not_an_export(capsys, ckpt, earlier, tmp_path, monkeypatch):
    user = tmp_path / "project"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (user / "src").mkdir()
    code, err = cli(capsys, "export", ckpt, "--format", "onnx", "-o", user, "--overwrite")
    assert code == 2
    one_line_error(err, str(user), "notes.txt", "src", "not one")
    assert (user / "notes.txt").read_text() == "mine" and (user / "src").is_dir()

    monkeypatch.chdir(user)  # "-o ." in a project folder
    code, err = cli(capsys, "export", ckpt, "-o", ".", "--overwrite")
    assert code == 2 and sorted(os.listdir(user)) == ["notes.txt", "src"]
    one_line_error(err, "notes.txt")

    export = tmp_path / "export"  # an earlier export with a file of the user's put into it
    shutil.copytree(earlier["onnx"], export)
    (export / "my-results.csv").write_text("1,2")
    code, err = cli(capsys, "export", ckpt, "-o", export, "--overwrite")
    assert code == 2 and (export / "my-results.csv").is_file()
    one_line_error(err, "my-results.csv", "did not write")

    link = tmp_path / "link"
    link.symlink_to(earlier["onnx"])
    code, err = cli(capsys, "export", ckpt, "-o", link, "--overwrite")
    assert code == 2 and link.is_symlink()
    one_line_error(err, "symlink")

    code, err = cli(capsys, "export", ckpt, "-o", export)  # no --overwrite at all
    assert code == 2
    one_line_error(err, "already exists", "--overwrite")
    assert leftovers(user) == leftovers(export) == []

    from gemma_edge.checkpoints import resolve
    from gemma_edge.exporters.onnx import export_onnx
    from gemma_edge.exporters.settings import ExportSettings

    with pytest.raises(OutputFolderError, match="notes.txt"):  # the Python API says the same
        export_onnx(resolve(ckpt), ExportSettings(format="onnx", max_seq_len=MAX_SEQ_LEN), user, overwrite=True)
    assert sorted(os.listdir(user)) == ["notes.txt", "src"]


def test_a_signal_while_writing_or_committing_loses_nothing(capsys, ckpt, earlier, tmp_path, monkeypatch):
    """The last stages, too short to hit from outside: SIGTERM's exception raised as the tokenizer is
    copied (the program already written), and a signal held back while the folders are renamed."""
    from gemma_edge.errors import Terminated
    from gemma_edge.files import signals_deferred

    out = tmp_path / "out"
    shutil.copytree(earlier["onnx"], out)
    before = tree(out)

    def terminated(ckpt, folder):
        assert (folder / "model.onnx").is_file()  # in the middle of writing
        raise Terminated()
    monkeypatch.setattr("gemma_edge.exporters.onnx.copy_tokenizer", terminated)
    code, err = cli(capsys, "export", ckpt, "--format", "onnx", "--quant", "fp32", "--max-seq-len", MAX_SEQ_LEN,
                    "-o", out, "--overwrite")
    assert code == 143 and err.strip().splitlines()[-1] == "gemma-edge: terminated" and "Traceback" not in err
    assert tree(out) == before and leftovers(out) == []

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("handled"))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("renamed")
        assert seen == ["renamed", "handled"]  # delivered after the block, not inside it
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_as_the_partial_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The instant after the temporary folder exists and before the export holds its name (where
    the signal lands when sent just after "✓ resolve", under load): it is still removed."""
    import gemma_edge.files as files
    from gemma_edge.cli import _terminate

    made = files.make_temp_dir

    def made_then_terminated(*args):
        folder = made(*args)
        signal.raise_signal(signal.SIGTERM)
        return folder
    monkeypatch.setattr(files, "make_temp_dir", made_then_terminated)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with pytest.raises(KeyboardInterrupt), files.staged_folder(tmp_path / "out"):
            pytest.fail("the export went on after the signal")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


def export_process(ckpt: Path, out: Path, fmt: str = "onnx", stdout=subprocess.DEVNULL) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gemma_edge.cli", "export", str(ckpt), "--format", fmt, "--quant", "fp32",
            "--max-seq-len", str(MAX_SEQ_LEN), "-o", str(out), "--overwrite"]
    # Ctrl-C as a terminal delivers it: a suite started as a shell's background job inherits SIGINT
    # ignored (and the export with it, which then rightly runs on), so the child gets the default.
    return subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_until(process: subprocess.Popen, marker: str) -> list[str]:
    """stderr lines of the export until one has marker (a stage just ended: the next has begun)."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"the export ended before {marker!r}:\n{''.join(lines)}")


@pytest.mark.parametrize("fmt, signum, after", [
    ("onnx", signal.SIGINT, "✓ resolve"),  # in load, or the trace just after it
    ("onnx", signal.SIGTERM, "✓ load"),  # in the trace
    ("pte", signal.SIGTERM, "✓ load and quantize"),  # in ExecuTorch's lowering
])
def test_a_signal_during_an_export_leaves_the_earlier_export_and_nothing_else(ckpt, earlier, tmp_path, fmt, signum, after):
    out = tmp_path / "out"
    shutil.copytree(earlier[fmt], out)
    before = tree(out)
    process = export_process(ckpt, out, fmt)
    lines = read_until(process, after)
    if after != "✓ resolve":  # (the exporter makes it just after resolving)
        assert any(p.startswith(".out.partial-") for p in leftovers(out))  # the export is under way
    process.send_signal(signum)
    err = "".join(lines) + process.stderr.read()
    code = process.wait(timeout=120)
    assert code == (130 if signum == signal.SIGINT else 143), err
    assert err.strip().splitlines()[-1] == ("gemma-edge: interrupted" if signum == signal.SIGINT else "gemma-edge: terminated")
    assert "Traceback" not in err
    ours = ("✓ ", "gemma-edge: ", "expected peak memory ")
    assert all(line.startswith(ours) for line in err.strip().splitlines()), err  # ours only
    assert tree(out) == before and leftovers(out) == []


CONVERTED = """
    try:
        signal.raise_signal(signal.{})
    except KeyboardInterrupt as e:
        raise RuntimeError("Attempted to unset ProxyTorchDispatchMode, but there wasn't one active.") from e"""
VERBS_CUT_BY_A_SIGNAL = {
    # A KeyboardInterrupt out of a string exec (a dataclass being defined as a module is imported,
    # torch.fx's generated code): CPython then ended `python -m gemma_edge.cli` by SIGINT (-2).
    "in-exec": '\n    exec("raise KeyboardInterrupt", {})',
    # A library turning the signal's exception into its own (torch's ONNX exporter cut in its
    # dispatch mode raises RuntimeError, wrapped in a ConversionError): a traceback and exit 1.
    "SIGINT-converted": CONVERTED.format("SIGINT"),
    "SIGTERM-converted": CONVERTED.format("SIGTERM"),
}


@pytest.mark.parametrize("how", VERBS_CUT_BY_A_SIGNAL)
def test_a_signal_ends_the_command_with_its_code_whatever_a_library_made_of_it(tmp_path, how):
    """Found by sending Ctrl-C at random moments of an export (6 of 80 just after "✓ resolve" under
    load ended by SIGINT, 1 of 40 in the trace exited 1 with torch's traceback): each cause alone,
    through `python -m gemma_edge.cli`'s way of running (a module's sys.exit) as the tests run it."""
    process = run_as_verb(tmp_path, VERBS_CUT_BY_A_SIGNAL[how])
    terminated = how.startswith("SIGTERM")
    assert process.returncode == (143 if terminated else 130), process.stderr
    assert process.stderr == f"gemma-edge: {'terminated' if terminated else 'interrupted'}\n"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_whose_exception_python_lost_still_stops_the_export_before_its_commit(tmp_path, signame):
    """Python prints an exception raised inside a finalizer as "Exception ignored in ..." and goes
    on (one Ctrl-C of 80 in benchmarks/interrupts.py, on the code before the signals' record, ended
    0): the handlers' record stops the folder before its rename, and the report is not shown."""
    process = run_as_verb(tmp_path, f"""
    with staged_folder(Path("out")) as tmp:
        (tmp / "half").write_text("x")
        held = Held()
        weakref.finalize(held, signal.raise_signal, signal.{signame})
        del held  # the finalizer runs: the signal's exception is raised in it, reported and lost
        (tmp / "rest").write_text("y")
    print("went on", file=sys.stderr)
    return 0""", "import weakref\nfrom pathlib import Path\nfrom gemma_edge.files import staged_folder\nclass Held: pass")
    terminated = signame == "SIGTERM"
    assert process.returncode == (143 if terminated else 130), process.stderr
    assert process.stderr == f"gemma-edge: {'terminated' if terminated else 'interrupted'}\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["cut.py"]  # no out, no partial


def test_a_command_s_signals_are_its_own(monkeypatch, tmp_path, capsys):
    """What the process does after an interrupted command (a notebook, a test) commits its work."""
    from gemma_edge import cli
    from gemma_edge.files import signals_received, staged_folder

    monkeypatch.setattr(cli, "_variants", lambda args: signals_received.append(signal.SIGINT) or 0)  # as if lost
    assert main(["variants"]) == 130 and capsys.readouterr().err == "gemma-edge: interrupted\n"
    with staged_folder(tmp_path / "out") as tmp:
        (tmp / "done").write_text("x")
    assert (tmp_path / "out" / "done").is_file()


def run_as_verb(folder: Path, body: str, header: str = "") -> subprocess.CompletedProcess:
    """`python -m gemma_edge.cli`'s way of running (a module's sys.exit), with a verb made of body."""
    (folder / "cut.py").write_text(f"""import signal, sys
from gemma_edge import cli
{header}

def verb(args):{body}

cli._variants = verb
sys.exit(cli.main(["variants"]))
""")
    path = os.pathsep.join(filter(None, [str(Path(gemma_edge.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "cut"], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_after_a_kill_the_next_export_removes_the_dead_runs_partial_folder(ckpt, earlier, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(earlier["onnx"], out)
    before = tree(out)
    process = export_process(ckpt, out)
    read_until(process, "✓ load")
    process.kill()  # SIGKILL: nothing can clean up
    process.wait(timeout=60)
    dead = leftovers(out)
    assert len(dead) == 1 and dead[0].startswith(f".out.partial-{process.pid}-") and tree(out) == before
    # A partial folder of a live export (ours, this process) and one that is not ours stay.
    alive = tmp_path / f".out.partial-{os.getpid()}-live"
    other = tmp_path / ".out.partial-by-someone"
    alive.mkdir(), other.mkdir()

    copied = (out / MANIFEST).stat().st_ino  # the same checkpoint exports to the same bytes: tell them apart by file
    process = export_process(ckpt, out, stdout=subprocess.PIPE)
    stdout, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert f"gemma-edge verify {out}" in stdout and f"adb push {out}" in stdout  # what to do next
    assert leftovers(out) == sorted([alive.name, other.name])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"] == str(ckpt) and (out / MANIFEST).stat().st_ino != copied  # the new, complete export


def test_a_run_killed_between_its_two_renames_gets_its_export_back(earlier, tmp_path):
    """The instant between moving the old export aside and the new one in: the next run puts the
    old one back (and, without --overwrite, then leaves it alone)."""
    from gemma_edge.files import check_output_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.old-{int(dead.stdout)}-x"
    shutil.copytree(earlier["onnx"], aside)
    with pytest.raises(OutputFolderError, match="already exists"):
        check_output_folder(tmp_path / "out", overwrite=False)
    assert tree(tmp_path / "out") == tree(earlier["onnx"]) and leftovers(tmp_path / "out") == []


@contextlib.contextmanager
def small_disk(path: Path, size: str, *options: str):
    """A tmpfs of `size` mounted at path (root only); None where mounting is not allowed."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}",) + options), "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_or_a_read_only_folder_is_a_clear_error_and_loses_nothing(capsys, ckpt, earlier, tmp_path, monkeypatch):
    size = sum(f.stat().st_size for f in earlier["onnx"].iterdir())
    with small_disk(tmp_path / "disk", f"{int(size * 1.5)}") as disk:
        if disk is None:  # no mount here: a writer that fails as a full disk does
            import onnx

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "disk" / "out" / "model.onnx"))
            monkeypatch.setattr(onnx, "save_model", full)
            disk = tmp_path / "disk"
        out = disk / "out"
        shutil.copytree(earlier["onnx"], out)
        before = tree(out)
        code, err = cli(capsys, "export", ckpt, "--format", "onnx", "--quant", "fp32", "--max-seq-len", MAX_SEQ_LEN,
                        "-o", out, "--overwrite")
        assert code == 2
        last = err.strip().splitlines()[-1]
        assert last.startswith("gemma-edge: error: cannot write the export in") and "the disk is full" in last, err
        assert "Traceback" not in err and tree(out) == before and leftovers(out) == []

    with small_disk(tmp_path / "ro", "1m", "ro") as ro:
        if ro is None:
            def refuse(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))
            monkeypatch.setattr("gemma_edge.files.make_temp_dir", refuse)
            ro = tmp_path / "ro"
        code, err = cli(capsys, "export", ckpt, "--format", "onnx", "--max-seq-len", MAX_SEQ_LEN, "-o", ro / "out")
        assert code == 2 and "the file system is read-only" in err.strip().splitlines()[-1], err
        assert list(ro.iterdir()) == []


def test_a_full_disk_a_writer_reports_without_an_errno_is_still_a_clear_error(tmp_path, monkeypatch):
    """numpy's tofile (onnx_ir writes an ONNX export's weights with it) says only "problem writing
    element N to file" when the disk fills up, with no errno: the disk's free space tells the cause
    (a cold CI run's full-disk export once stopped there with a traceback)."""
    from types import SimpleNamespace

    from gemma_edge import files

    target = tmp_path / "out"

    def export_that_fails_to_write():
        with files.staged_folder(target) as tmp:
            (tmp / "model.onnx.data").write_bytes(b"weights")
            raise OSError("problem writing element 29696 to file")

    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(total=1 << 30, used=1 << 30, free=4096))
    with pytest.raises(OutputFolderError, match="the disk is full .problem writing element 29696 to file.; free some space"):
        export_that_fails_to_write()
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(total=1 << 30, used=0, free=1 << 30))
    with pytest.raises(OSError, match="problem writing element") as raised:  # room left: not the disk's, shown as it is
        export_that_fails_to_write()
    assert type(raised.value) is OSError and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Damaged and hostile export folders

def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def truncate(path: Path, keep: int = 4096) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def with_external_data(folder: Path) -> Path:
    """The ONNX export re-saved with its weights in model.onnx.data (as a >2 GB export is), manifest updated."""
    import onnx

    from gemma_edge.files import sha256_file

    onnx.save_model(onnx.load(str(folder / "model.onnx")), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in ("model.onnx", "model.onnx.data"):
        manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("fmt, damaged", [("pte", "model.pte"), ("pte", "model.ptd"), ("onnx", "model.onnx"),
                                          ("onnx", "model.onnx.data"), ("pte", "tokenizer.json")])
def test_a_truncated_file_is_named_before_any_runtime_reads_it(capsys, earlier, tmp_path, fmt, damaged):
    from gemma_edge.runtime import Generator

    folder = copy_of(earlier[fmt], tmp_path)
    if damaged == "model.onnx.data":
        with_external_data(folder)
    truncate(folder / damaged)
    code, err = cli(capsys, "generate", folder, "Hello")
    assert code == 2
    one_line_error(err, str(folder / damaged), "truncated: 4,096 bytes", "gemma-edge verify", "export it anew")
    with pytest.raises(DamagedExportError) as error:  # the Python API: the same message
        Generator.load(folder)
    assert f"gemma-edge: error: {error.value}" == err.strip()
    with pytest.raises(DamagedExportError):  # --debug: the exception itself, traceback and all
        main(["--debug", "generate", str(folder), "Hello"])
    code, err = cli(capsys, "verify", folder)  # verify's answer is a failed check
    assert code == 1 and f"{folder / damaged}: truncated" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_a_file_damaged_in_place_is_named_by_its_loader_or_its_checksum(capsys, earlier, tmp_path, fmt):
    folder = copy_of(earlier[fmt], tmp_path)
    program = folder / f"model.{fmt}"
    data = bytearray(program.read_bytes())
    data[:64] = bytes(64)  # the header: same size, no longer a program
    program.write_bytes(bytes(data))
    code, err = cli(capsys, "generate", folder, "Hello")
    runtime = "ExecuTorch" if fmt == "pte" else "ONNX Runtime"
    assert code == 2
    one_line_error(err, str(program), f"{runtime} cannot load it", "gemma-edge verify")

    folder = copy_of(earlier[fmt], tmp_path, "weights")
    weights = folder / ("model.ptd" if fmt == "pte" else "model.onnx")  # a .pte's weights are in its data file
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight byte: it still loads and runs
    weights.write_bytes(bytes(data))
    code, err = cli(capsys, "generate", folder, "Hello", "-n", 2, "--verify-checksums")
    assert code == 2
    one_line_error(err, str(weights), "SHA-256 differs")
    capsys.readouterr()
    assert main(["generate", str(folder), "Hello", "-n", "2"]) == 0  # sizes only, by default: it runs


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_a_manifest_cannot_point_outside_its_folder(capsys, earlier, tmp_path, how):
    folder = copy_of(earlier["onnx"], tmp_path, "export")
    outside = copy_of(earlier["onnx"], tmp_path, "outside")  # a working program: following it would run
    if how == "symlink":
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to(outside / "model.onnx")
        message = "outside the export folder"
    else:
        name = "../outside/model.onnx" if how == "parent" else str(outside / "model.onnx")
        edit_manifest(folder, lambda m: m["io"].update(program=name))
        message = f"names the file {name!r}, which is not a plain file name"
    for argv in (["generate", folder, "Hello"], ["inspect", folder], ["verify", folder], ["chat", folder]):
        code, err = cli(capsys, *argv)
        assert code == 2, argv
        one_line_error(err, message)
    from gemma_edge.runtime import Generator

    with pytest.raises(UnsafeManifestError):
        Generator.load(folder)


def test_a_symlink_inside_the_folder_is_fine(capsys, earlier, tmp_path):
    """A link to a file in the same folder stays inside: the check is where it leads, not that it links."""
    folder = copy_of(earlier["onnx"], tmp_path)
    (folder / "model.onnx").rename(folder / "real.onnx")
    (folder / "model.onnx").symlink_to("real.onnx")
    code, err = cli(capsys, "generate", folder, "Hello", "-n", "2")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# Arguments are checked before anything loads

@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be >= 0"),
    (["-n", "0"], "--max-new-tokens must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
])
def test_bad_arguments_are_refused_before_loading(capsys, earlier, monkeypatch, flags, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the program was loaded for a request that is refused")
    monkeypatch.setattr("gemma_edge.runtime.backend.open_backend", no_loading)
    monkeypatch.setattr("gemma_edge.runtime.generator.open_backend", no_loading)
    for verb in (["generate", earlier["onnx"], "Hello"], ["chat", earlier["pte"]]):
        code, err = cli(capsys, *verb, *flags)
        assert code == 2
        one_line_error(err, message)


def test_a_prompt_longer_than_the_cache_is_refused_before_loading(capsys, earlier, monkeypatch):
    monkeypatch.setattr("gemma_edge.runtime.backend.open_backend", lambda *a, **k: pytest.fail("loaded"))
    code, err = cli(capsys, "generate", earlier["pte"], "word " * 200)
    assert code == 2
    one_line_error(err, f"but the cache holds {MAX_SEQ_LEN}", "--truncate left")


# ---------------------------------------------------------------------------------------------
# Files from strangers: no pickle, and headers checked before anything is allocated

def test_the_package_never_unpickles():
    """torch.load without weights_only=True, pickle, numpy's allow_pickle=True: none in the package."""
    found = []
    for path in Path(gemma_edge.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                found += [f"{path.name}: imports {n}" for n in names if n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib")]
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if name.endswith("torch.load") and keywords.get("weights_only") != "True":
                    found.append(f"{path.name}: {ast.unparse(node)}")
                if keywords.get("allow_pickle") not in (None, "False"):
                    found.append(f"{path.name}: {ast.unparse(node)}")
    assert found == []


def test_a_hostile_safetensors_header_is_refused_before_allocating(capsys, tmp_path, ckpt):
    import struct

    from gemma_edge.checkpoints import load_model

    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}})
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(64))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(folder, 16)
    code, err = cli(capsys, "check", folder)
    assert code == 2
    one_line_error(err, "model.safetensors", "not a readable safetensors file")

    shutil.copy(ckpt / "model.safetensors", folder / "model.safetensors")  # real weights, a config 4096x wider
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] *= 4096
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor model\.\S+ has shape \[\d+, \d+\], but config.json asks for"):
        load_model(folder, 16)


def test_a_damaged_gguf_is_refused_before_allocating(capsys, tmp_path, monkeypatch):
    import struct

    import gguf

    monkeypatch.setenv("GEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    data = path.read_bytes()
    truncated, huge = tmp_path / "truncated.gguf", tmp_path / "huge.gguf"
    truncated.write_bytes(data[:-100])
    dims = data.index(struct.pack("<QQ", 32, 64), data.index(b"token_embd.weight"))  # its shape, innermost first
    huge.write_bytes(data[:dims] + struct.pack("<QQ", 1 << 20, 1 << 20) + data[dims + 16:])  # 2^40 elements
    for bad in (truncated, huge):
        code, err = cli(capsys, "check", bad)
        assert code == 2
        one_line_error(err, str(bad), "declares tensors that the file does not hold", "truncated or damaged")


# ---------------------------------------------------------------------------------------------
# Caches and reports are written whole

def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    from gemma_edge.commands.ui import write_json
    from gemma_edge.verify import Golden

    report = tmp_path / "report.json"
    write_json(report, {"passed": True})

    def crash(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json(report, {"passed": False})
    golden = Golden([1, 2, 3], 2, np.zeros((2, 5), np.float32), [4])
    with pytest.raises(OSError):
        golden.save(tmp_path / "golden.npz")
    monkeypatch.undo()
    assert json.loads(report.read_text()) == {"passed": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file, no half golden
    golden.save(tmp_path / "golden.npz")
    assert Golden.load(tmp_path / "golden.npz").ids == [1, 2, 3]
    truncate(tmp_path / "golden.npz", 100)
    with pytest.raises(gemma_edge.errors.GemmaEdgeError, match="not a golden file"):
        Golden.load(tmp_path / "golden.npz")


def test_a_half_made_arm64_kit_is_rebuilt_not_used(tmp_path, monkeypatch):
    """A setup killed while unpacking QEMU leaves qemu.partial (never qemu/) and no `ready`: the next
    use unpacks again."""
    from gemma_edge import emulation

    monkeypatch.setenv("GEMMA_EDGE_CACHE", str(tmp_path))
    base = emulation.arm64_dir()
    (base / "qemu.partial" / "usr" / "bin").mkdir(parents=True)
    (base / "qemu.partial" / "usr" / "bin" / "qemu-aarch64").write_bytes(b"\x7fELF half")
    ran = []

    def fake_run(cmd, what, cwd=None):
        ran.append(cmd[cmd.index("download") if "download" in cmd else 0])
        if cmd[0] == "apt-get" and "download" in cmd:
            (cwd / "qemu-user_10_arm64.deb").write_bytes(b"deb")
        if cmd[0] == "dpkg":
            (Path(cmd[-1]) / "usr" / "bin").mkdir(parents=True)
            (Path(cmd[-1]) / "usr" / "bin" / "qemu-aarch64").write_bytes(b"\x7fELF whole")
    monkeypatch.setattr(emulation, "_run", fake_run)
    emulation._qemu(base)
    assert "dpkg" in ran and (base / "qemu" / "usr" / "bin" / "qemu-aarch64").read_bytes() == b"\x7fELF whole"
    assert not (base / "qemu.partial").exists()
    ran.clear()
    emulation._qemu(base)  # now whole: not redone
    assert ran == []


HOLD = """import sys, time
from pathlib import Path
from gemma_edge.files import exclusive
with exclusive(Path(sys.argv[1])):
    with open(sys.argv[2], "a") as log:
        log.write(f"in {sys.argv[3]}\\n")
    time.sleep(float(sys.argv[4]))
    with open(sys.argv[2], "a") as log:
        log.write(f"out {sys.argv[3]}\\n")
"""


def test_one_process_at_a_time_makes_what_they_share_and_a_killed_one_lets_go(tmp_path):
    """files.exclusive, which the GGUF conversion, the arm64 kit, its runner and the tests' export
    cache take: three processes at once go in one after another; a holder killed with SIGKILL (no
    clean-up of its own) does not keep the next one out."""
    lock, log = tmp_path / "lock", tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, lock, log, str(i), "0.3"]) for i in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    lines = log.read_text().split("\n")[:-1]
    assert len(lines) == 6 and all(lines[i].split()[1] == lines[i + 1].split()[1] and lines[i].startswith("in ")
                                   and lines[i + 1].startswith("out ") for i in range(0, 6, 2)), lines
    log.unlink()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, lock, log, "killed", "600"])
    while not (log.is_file() and log.read_text() == "in killed\n"):
        assert holder.poll() is None
        time.sleep(0.05)  # (not spinning beside the holder's start on two cores)
    holder.kill()
    holder.wait()
    assert subprocess.run([sys.executable, "-c", HOLD, lock, log, "next", "0"], timeout=60).returncode == 0
    assert log.read_text() == "in killed\nin next\nout next\n"


# ---------------------------------------------------------------------------------------------
# Long runs, and more than one Generator

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_fifty_generations_that_fill_the_cache_leak_nothing(earlier, fmt):
    from gemma_edge.runtime import Generator

    gen = Generator.load(earlier[fmt])
    prompt = "The quick brown fox"
    first = gen.generate(prompt, MAX_SEQ_LEN, ignore_eos=True)
    assert gen.last.finish_reason == "length"
    assert gen.last.stats.prompt_tokens + gen.last.stats.generated_tokens >= MAX_SEQ_LEN - 1  # the cache is full
    after_first = (rss_bytes(), len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")))
    for i in range(49):
        if i % 3 == 0:
            gen.reset()
        elif i % 3 == 1:  # chat turns that reuse the cache, then a plain prompt again
            gen.chat([{"role": "user", "content": "Hi"}], 8)
            gen.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": gen.last.text},
                      {"role": "user", "content": "More"}], 8)
            assert gen.last.stats.cached_tokens > 0 or not gen.backend.can_rewind  # (a ring cache starts over)
        assert gen.generate(prompt, MAX_SEQ_LEN, ignore_eos=True) == first
    rss, fds, threads = rss_bytes(), len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
    assert rss <= after_first[0] * 1.05, (rss, after_first[0])
    assert (fds, threads) <= after_first[1:], (fds, threads, after_first)


def test_two_generators_side_by_side_and_one_generator_per_thread(earlier):
    from gemma_edge.runtime import Generator

    onnx, pte = Generator.load(earlier["onnx"]), Generator.load(earlier["pte"])
    alone = {name: g.generate("Hello there", 12) for name, g in (("onnx", onnx), ("pte", pte))}
    onnx_stream, pte_stream = onnx.stream("Hello there", 12), pte.stream("Hello there", 12)
    interleaved = {"onnx": "", "pte": ""}
    for a, b in zip(onnx_stream, pte_stream):  # one step of each in turn
        interleaved["onnx"] += a
        interleaved["pte"] += b
    interleaved["onnx"] += "".join(onnx_stream)
    interleaved["pte"] += "".join(pte_stream)
    assert interleaved == alone

    stream = onnx.stream("Hello there", 12)
    next(stream)  # a generation under way in this thread
    errors = []

    def other_thread():
        try:
            onnx.generate("Something else", 4)
        except ConcurrentUseError as e:
            errors.append(str(e))
    thread = threading.Thread(target=other_thread)
    thread.start(), thread.join()
    assert len(errors) == 1 and "give each thread its own Generator" in errors[0]
    stream.close()  # done: now the other thread may use it
    thread = threading.Thread(target=other_thread)
    thread.start(), thread.join()
    assert len(errors) == 1 and onnx.last.stats.prompt_tokens > 0


def test_chat_says_a_turn_is_too_long_and_goes_on(capsys, earlier, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 200 + "\nhi\n/quit\n"))
    code, err = cli(capsys, "chat", earlier["onnx"], "-n", "4", "--verbose")
    assert code == 0, err
    assert f"but the cache holds {MAX_SEQ_LEN}" in err and "Traceback" not in err
    assert err.count("finish:") == 1  # the next turn was answered
