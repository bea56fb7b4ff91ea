"""Loading a model in a separate, low-priority process, and handing it over without a copy.

A load is mostly Python (tokenizer parsing, module construction, safetensors bookkeeping) and
holds the GIL; in the serving process it stalls every engine the executor steps (measured 0.22x
of a model's decode speed while another loaded, docs/HOST.md). So a load beside loaded models
runs in one long-lived child process, at the lowest CPU priority with one torch thread:
conversion, quantization, tokenizer and weights are all built there. The child copies every
tensor storage of the result into one anonymous shared-memory file (``memfd``) and pickles the
rest (module tree, config, tokenizer) with tensors replaced by (offset, dtype, shape, stride)
records. The parent receives the file descriptor over the pipe, maps it, and unpickles: the
tensors become views of that mapping, so the weights are never copied or re-read, and the
only work left in the serving process is the unpickling itself.

The child is started on first use and kept for later loads (its imports are paid once);
``shutdown()`` stops it. A crashed child (killed, out of memory) is reported as a typed error
and a new one is started for the next load."""

from __future__ import annotations

import atexit
import io
import logging
import mmap
import os
import pickle
import subprocess
import threading
from typing import Any, Callable, Optional

log = logging.getLogger("llamawrapper.loading")

ALIGN = 64  # the packed int4/int8 kernels need aligned rows: every storage starts on 64 bytes
NICE = 10  # the child's default CPU priority (LLAMAWRAPPER_LOAD_NICE): see docs/HOST.md
HELD_TOKENIZERS = 4  # tokenizers kept for reuse by later loads (their Rust backends stay in memory)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")

_rebuild_state = threading.local()


# -- the hand-over format -------------------------------------------------------------------------
class _ArenaPickler(pickle.Pickler):
    """Pickles tensors as records pointing into an arena of their storages (collected here)."""

    def __init__(self, file: Any, by_reference: Optional[dict[int, str]] = None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.storages: list[Any] = []  # untyped storages, in arena order
        self._index: dict[int, int] = {}  # storage data_ptr -> index
        self._by_reference = by_reference or {}  # id(object) -> key the receiver already holds

    def persistent_id(self, obj: Any) -> Any:
        key = self._by_reference.get(id(obj))
        return ("held", key) if key is not None else None

    def reducer_override(self, obj: Any) -> Any:
        import torch

        if not isinstance(obj, torch.Tensor) or type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return NotImplemented
        if obj.device.type != "cpu":
            raise ValueError(f"only CPU tensors can be handed over, got one on {obj.device}")
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key not in self._index:
            self._index[key] = len(self.storages)
            self.storages.append(storage)
        record = (self._index[key], str(obj.dtype).removeprefix("torch."), tuple(obj.shape), tuple(obj.stride()),
                  obj.storage_offset(), obj.requires_grad, isinstance(obj, torch.nn.Parameter))
        return _rebuild_tensor, record


def _rebuild_tensor(index: int, dtype: str, shape: tuple, stride: tuple, offset: int, requires_grad: bool,
                    parameter: bool) -> Any:
    """A tensor as a view of the mapped arena (called while unpickling)."""
    import torch

    arena, offsets = _rebuild_state.arena, _rebuild_state.offsets
    dt = getattr(torch, dtype)
    start = offsets[index]
    if start % dt.itemsize:
        raise ValueError("misaligned storage in the hand-over arena")
    t = arena.view(dt).as_strided(shape, stride, start // dt.itemsize + offset) if arena.numel() else torch.empty(shape, dtype=dt)
    return torch.nn.Parameter(t, requires_grad=requires_grad) if parameter else t


class _ArenaUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, held: dict[str, Any]) -> None:
        super().__init__(file)
        self._held = held

    def persistent_load(self, pid: Any) -> Any:
        import copy

        kind, key = pid
        if kind != "held" or key not in self._held:
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in the hand-over")
        return copy.copy(self._held[key])  # own Python attributes, shared (immutable) backend


def pack(obj: Any, by_reference: Optional[dict[int, str]] = None) -> tuple[bytes, list[int], int, int]:
    """``obj`` as (pickle bytes, arena offsets, arena size, memfd): every tensor storage it
    references is copied once into a new anonymous shared-memory file. Objects whose ``id`` is
    in ``by_reference`` are sent as their key (the receiver holds an equal one)."""
    import torch

    buf = io.BytesIO()
    pickler = _ArenaPickler(buf, by_reference)
    pickler.dump(obj)
    offsets, size = [], 0
    for storage in pickler.storages:
        offsets.append(size)
        size += -(-storage.nbytes() // ALIGN) * ALIGN
    size = max(size, ALIGN)
    fd = os.memfd_create("llamawrapper-weights", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            arena = torch.frombuffer(mm, dtype=torch.uint8)
            for storage, start in zip(pickler.storages, offsets):
                n = storage.nbytes()
                if n:
                    src = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,), (1,))
                    arena[start:start + n].copy_(src)
            del arena
    except BaseException:
        os.close(fd)
        raise
    return buf.getvalue(), offsets, size, fd


def unpack(data: bytes, offsets: list[int], size: int, fd: int, held: Optional[dict[str, Any]] = None) -> Any:
    """The object ``pack`` produced, its tensors viewing the shared-memory file ``fd`` (closed
    here; the mapping lives as long as any of the tensors); references resolve from ``held``."""
    import torch

    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    _rebuild_state.arena, _rebuild_state.offsets = torch.frombuffer(mm, dtype=torch.uint8), offsets
    try:
        return _ArenaUnpickler(io.BytesIO(data), held or {}).load()
    finally:
        _rebuild_state.arena = _rebuild_state.offsets = None


# -- the child ------------------------------------------------------------------------------------
def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _child_main(conn: Any, parent_pid: int) -> None:
    """The loader process: at the lowest priority, one torch thread, load what it is asked."""
    import signal
    from multiprocessing.reduction import send_handle

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; EOF stops us
    signal.signal(signal.SIGTERM, _exit_cleanly)  # the parent's stop while busy: finally blocks run
    try:  # absolute: the parent's loading thread may itself run at a lowered priority
        os.setpriority(os.PRIO_PROCESS, 0, nice_level())
    except (OSError, ValueError):
        pass
    import torch

    torch.set_num_threads(1)
    from ..engine.runner import prefuse
    from . import loading

    # what every load needs, imported once now rather than during the first load
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    while True:
        try:
            kind, kwargs, held, env = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        if kind == "ping":
            conn.send(("ok", None))
            continue
        os.environ.clear()  # the parent's environment as it is now (cache folder, offline mode...)
        os.environ.update(env)
        try:
            loaded = loading.load(**kwargs)
            prefuse(loaded.model)  # fused here, the parent's runner finds the parts as views of one weight
            key = tokenizer_key(loaded.folder, loaded.tokenizer)
            data, offsets, size, fd = pack(loaded, {id(loaded.tokenizer): key} if key in held else None)
            del loaded
        except SystemExit:  # stopped by the parent (SIGTERM): not the load's error, just go
            raise
        except BaseException as exc:  # the parent re-raises it
            conn.send(("error", _picklable(exc)))
            continue
        finally:
            _release_memory()
        try:
            conn.send(("ok", (data, offsets, size, key)))
            send_handle(conn, fd, parent_pid)
        except OSError:  # the parent is gone
            return
        finally:
            os.close(fd)


def nice_level() -> int:
    """The loader process's nice value: ``LLAMAWRAPPER_LOAD_NICE`` (0-19), else ``NICE``."""
    value = os.environ.get("LLAMAWRAPPER_LOAD_NICE", "").strip()
    return min(19, max(0, int(value))) if value else NICE


def tokenizer_key(folder: Any, tokenizer: Any) -> str:
    """What makes two loads' tokenizers equal: the class and the tokenizer files' contents."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _release_memory() -> None:
    """Give a finished load's memory back to the system (the child lives on between loads)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        from ..errors import InvalidModelError

        return InvalidModelError(f"{type(exc).__name__}: {exc}")


class LoadProcess:
    """The parent's side: one child, one load at a time."""

    def __init__(self) -> None:
        from collections import OrderedDict

        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        # key -> a snapshot taken at load time (a model's own tokenizer may be changed later,
        # e.g. a plugin's chat template); the most recent few
        self._tokenizers: "OrderedDict[str, Any]" = OrderedDict()
        self._unhashed: list[tuple[Any, Any]] = []  # (folder, snapshot) loaded in this process

    def _ensure(self) -> None:
        """Start the child with ``python -c`` (not multiprocessing's spawn, which would re-run
        the user's unguarded ``__main__`` script in the child)."""
        import socket
        import sys
        from multiprocessing.connection import Connection
        from pathlib import Path

        if self._proc is not None and self._proc.poll() is None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from llamawrapper.models.load_process import child_entry; child_entry()",
                 str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())

    def start(self, wait: bool = False) -> None:
        """Start the child now (its imports take a few seconds), so a later load does not wait;
        with ``wait``, return once it is ready to load."""
        with self._lock:
            self._ensure()
            if wait:
                self._conn.send(("ping", None, None, None))
                self._conn.recv()

    def load(self, handover: Optional[Callable[[Callable[[], Any]], Any]] = None, **kwargs: Any) -> Any:
        """``loading.load(**kwargs)`` run in the child; returns its ``LoadedModel``. The
        hand-over (mapping and unpickling, the only part that holds this process's GIL) runs
        through ``handover(fn)`` if given (the executor runs it between two steps)."""
        from multiprocessing.reduction import recv_handle

        from ..errors import ModelUnavailableError

        with self._lock:
            self._ensure()
            for folder, tokenizer in self._unhashed:
                self._hold(tokenizer_key(folder, tokenizer), tokenizer)
            self._unhashed.clear()
            held = dict(self._tokenizers)
            try:
                self._conn.send(("load", kwargs, set(held), dict(os.environ)))
                status, payload = self._conn.recv()
                if status == "error":
                    raise payload
                fd = recv_handle(self._conn)
            except (EOFError, OSError) as exc:
                code = self._proc.poll() if self._proc is not None else None
                self._stop_locked()
                raise ModelUnavailableError(f"the loader process died while loading (exit code {code}): {exc or 'no answer'}") from None
        data, offsets, size, key = payload
        try:
            loaded = (handover or (lambda fn: fn()))(lambda: unpack(data, offsets, size, fd, held))
        except BaseException:
            try:
                os.close(fd)  # unless unpack already took (and closed) it
            except OSError:
                pass
            raise
        self._hold(key, loaded.tokenizer)
        return loaded

    def remember(self, loaded: Any) -> None:
        """Offer a model loaded in this process for tokenizer reuse by later loads. Its files
        are hashed only when a load actually goes to the child (most processes never do)."""
        import copy

        with self._lock:
            self._unhashed.append((loaded.folder, copy.copy(loaded.tokenizer)))
            del self._unhashed[:-HELD_TOKENIZERS]

    def _hold(self, key: str, tokenizer: Any) -> None:
        import copy

        self._tokenizers[key] = copy.copy(tokenizer)  # as loaded, before any change to the model's own
        self._tokenizers.move_to_end(key)
        while len(self._tokenizers) > HELD_TOKENIZERS:
            self._tokenizers.popitem(last=False)

    def _stop_locked(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            try:
                conn.send(("stop", None, None, None))
            except (OSError, ValueError):
                pass
            conn.close()
        if proc is None:
            return
        try:  # an idle child reads "stop" (or EOF) and is gone at once
            proc.wait(0.5)
            return
        except subprocess.TimeoutExpired:
            pass
        # still importing torch at nice 10 (a server stopped soon after its start waited ~3 s
        # here) or mid-load
        _end(proc)

    def shutdown(self) -> None:
        if self._lock.acquire(timeout=0.5):
            try:
                self._stop_locked()
            finally:
                self._lock.release()
            return
        # a load holds the lock while the child works (a conversion can take minutes): end the
        # child, and the loading thread reports the load as failed when its answer never comes
        if self._proc is not None:
            _end(self._proc)

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None


def _end(proc: Any) -> None:
    """End a busy child: SIGTERM (``SystemExit`` there, so a half-built cache entry is removed by
    its own cleanup), SIGKILL if it is still there after 5 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


_process: Optional[LoadProcess] = None
_process_lock = threading.Lock()


def enabled() -> bool:
    """Whether loads beside loaded models go to the loader process (``LLAMAWRAPPER_LOAD_PROCESS=0``
    keeps them in the serving process)."""
    return os.environ.get("LLAMAWRAPPER_LOAD_PROCESS", "1").strip().lower() not in ("0", "false", "no", "off")


def start_load_process() -> None:
    """Start the loader process in the background if loads use it (a no-op once running)."""
    if enabled():
        get_load_process().start()


def get_load_process() -> LoadProcess:
    """The process-wide loader process (created on first use, not yet started)."""
    global _process
    with _process_lock:
        if _process is None:
            _process = LoadProcess()
            atexit.register(_process.shutdown)
        return _process



def child_entry() -> None:
    """``python -c "...child_entry()" FD PARENT_PID``: the loader process's entry point."""
    import sys
    from multiprocessing.connection import Connection

    _child_main(Connection(int(sys.argv[1])), int(sys.argv[2]))
