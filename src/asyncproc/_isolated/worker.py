"""Inside the isolated child: serve exactly one call, answer, clean up, exit.

Shared by the three start methods. A worker:

* leads its own session (so its group can be signalled as a whole, and a terminal's
  Ctrl-C, meant for the caller, never reaches it);
* is a child subreaper, so anything the call starts stays in its tree even when an
  intermediate process dies, and can be found and ended when the call is over;
* has faulthandler writing to a memfd the parent side reads after a fatal signal;
* exits with ``os._exit``: in "fork" mode a normal exit would run the caller's atexit
  handlers and flush its stdio buffers a second time.
"""

from __future__ import annotations

import _pickle as pickle  # the C module: the fork server imports us and stays lean
import _signal
import _socket
import _struct
import _thread
import faulthandler
import os
import resource
import sys

from .._proc import proctree as _proctree
from . import protocol as _protocol

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (and re) at run time

if TYPE_CHECKING:  # the fork server imports this module: no runtime typing, no dataclasses
    from collections.abc import Callable
    from typing import Any, NoReturn

    Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
else:
    Job = tuple  # at run time too: __all__ names only what imports

__all__ = ["CallSpec", "ForkedStart", "IDLE_NAME", "Job", "bind_libc", "close_serving_in_forks", "dumps", "encode_call",
           "forked_from_server", "forked_start", "hello", "prepare_process", "reset_inherited_signals", "run_one", "spawn_main",
           "warm_lookups"]

_SPEC_LEN = _struct.Struct("<I")

# What a worker calls on its way, bound to globals here, once, in the fork server: a
# forked worker runs its code unspecialized, and each ``module.attr`` there is a generic
# lookup that writes pages (see "a worker forked by the fork server" below).
_open, _read, _write, _close, _exit = os.open, os.read, os.write, os.close, os._exit
_dup2, _closerange, _setsid, _getpid, _getppid = os.dup2, os.closerange, os.setsid, os.getpid, os.getppid
_O_RDONLY_CLOEXEC, _O_WRONLY_CLOEXEC = os.O_RDONLY | os.O_CLOEXEC, os.O_WRONLY | os.O_CLOEXEC
_setrlimit, _RLIMIT_NOFILE = resource.setrlimit, resource.RLIMIT_NOFILE
_set_wakeup_fd, _set_handler, _SIG_DFL = _signal.set_wakeup_fd, _signal.signal, _signal.SIG_DFL
_SERVER_SIGNALS, _SIGINT, _default_int_handler = (_signal.SIGTERM, _signal.SIGCHLD, _signal.SIGHUP), _signal.SIGINT, _signal.default_int_handler
_pickle_dumps, _pickle_loads = pickle.dumps, pickle.loads
_thread_count = _thread._count
_sys_dict = sys.__dict__  # sys.stdout as the call left it (it may replace it)
_recvmsg, _send, _parse = _socket.socket.recvmsg, _protocol.send, _protocol.parse
_VALUE, _HELLO_FORMAT = _protocol.VALUE, _protocol.HELLO + b"\0%d %s"  # protocol.send's frame, no fds
_PACKET_MAX, _ANCILLARY_SPACE, _MSG_CMSG_CLOEXEC = _protocol.INLINE_MAX + 2, _protocol.ANCILLARY_SPACE, _socket.MSG_CMSG_CLOEXEC


class CallSpec:
    """What the child needs besides the call itself: limits and the caller's context."""

    __slots__ = ("memory_limit", "binding", "sys_path", "cwd", "env")

    def __init__(
        self,
        memory_limit: int | None = None,
        binding: Any = None,  # asyncproc.numa.Binding, applied before the call runs
        sys_path: tuple[str, ...] | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,  # None: keep the environment the worker has
    ):
        self.memory_limit = memory_limit
        self.binding = binding
        self.sys_path = sys_path
        self.cwd = cwd
        self.env = env

    def __reduce__(self) -> tuple[Any, ...]:
        return (CallSpec, (self.memory_limit, self.binding, self.sys_path, self.cwd, self.env))


def dumps(obj: Any) -> bytes:
    """Pickle by reference where that works (fast, keeps identity), else by value."""
    try:
        return _pickle_dumps(obj, 5)
    except Exception:
        return by_value_dumps(obj)  # lambdas, closures, classes of a __main__ we don't share


def encode_call(spec: CallSpec, job: Job) -> bytes:
    # No options (the usual call): no header to unpickle, a class to look up less.
    empty = spec.memory_limit is None and spec.binding is None and spec.sys_path is None and spec.cwd is None and spec.env is None
    head = b"" if empty else pickle.dumps(spec, protocol=5)
    return _SPEC_LEN.pack(len(head)) + head + _call_dumps(job)


_pickler_class: Any = None
_by_reference_class: Any = None


def _call_dumps(job: Job) -> bytes:
    """What ``by_value_dumps`` makes of the call, by the C pickler alone when nothing in it
    is pickled by value (the usual call: a function of a module, plain data): each
    cloudpickle Pickler runs Python code per object and looks each type up through two
    ChainMaps, several times the cost of the whole pickle here."""
    global _by_reference_class
    import io

    if _by_reference_class is None:
        _by_reference_class = _make_by_reference_class()
    buf = io.BytesIO()
    try:
        _by_reference_class(buf, protocol=5).dump(job)
    except Exception:  # NeedsValue; or a lambda, a local class: the C pickler refuses them
        return by_value_dumps(job)
    return buf.getvalue()


def _make_by_reference_class() -> Any:
    """A C pickler that gives up (NeedsValue) on whatever cloudpickle would pickle other
    than by reference: functions and classes it pickles by value (of ``__main__``, of a
    module made at run time or registered by value), and the types it has reducers for
    (code, cells, modules, bound methods, ...). Everything else pickles the same either way."""
    import types

    import cloudpickle
    from cloudpickle import cloudpickle as cp

    class NeedsValue(Exception):  # here, not at module level: the fork server imports us
        """Something in the call is pickled by value: cloudpickle's work."""

    by_reference = getattr(cp, "_should_pickle_by_reference", None)
    own_reducers = getattr(cloudpickle.Pickler, "_dispatch_table", None)
    if by_reference is None or not isinstance(own_reducers, dict):  # pragma: no cover - another cloudpickle

        def always_by_value(self: Any, obj: object) -> Any:
            raise NeedsValue

        return type("_ByValueOnly", (pickle.Pickler,), {"reducer_override": always_by_value})
    reducers: dict[type, Any] = own_reducers
    by_ref: Callable[[object], bool] = by_reference

    class ByReference(pickle.Pickler):
        def reducer_override(self, obj: object) -> Any:
            if type(obj) in reducers or (isinstance(obj, (types.FunctionType, type)) and not by_ref(obj)):
                raise NeedsValue
            return NotImplemented

    return ByReference


def by_value_dumps(obj: Any) -> bytes:
    """cloudpickle, except that code keeps its file name: cloudpickle 3.1 replaces it with
    "<dynamic-code>", and the child's traceback and crash stack would lose the caller's
    file and source lines (linecache finds them by that name)."""
    global _pickler_class
    import io

    if _pickler_class is None:
        _pickler_class = _make_pickler_class()
    buf = io.BytesIO()
    _pickler_class(buf, protocol=5).dump(obj)
    return buf.getvalue()


def _make_pickler_class() -> Any:
    import collections
    import types

    import cloudpickle
    from cloudpickle import cloudpickle as cp

    reduce_code = getattr(cp, "_code_reduce", None)
    if reduce_code is None:  # pragma: no cover - another cloudpickle: keep its behaviour
        return cloudpickle.Pickler

    def reduce_keeping_filename(code: types.CodeType) -> Any:
        rebuild, args = reduce_code(code)
        return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table = collections.ChainMap({types.CodeType: reduce_keeping_filename}, cloudpickle.Pickler.dispatch_table)

    return Pickler


_NO_OPTIONS = CallSpec()

# Set by the fork server when it could not take the caller's cwd: each call it forks a
# worker for fails with it, as it would have had the worker tried.
context_error: OSError | None = None


def _decode_call(body: bytes | memoryview) -> tuple[CallSpec, bytes | memoryview]:
    (size,) = _SPEC_LEN.unpack_from(body)
    start = _SPEC_LEN.size
    spec = pickle.loads(body[start : start + size]) if size else _NO_OPTIONS
    return spec, body[start + size :]


# -- process set-up ---------------------------------------------------------------------

# The folder that holds the top-level package: one dirname per dot in our module name, plus ours.
_PACKAGE_PARENT = os.path.abspath(__file__)
for _ in range(__name__.count(".") + 1):
    _PACKAGE_PARENT = os.path.dirname(_PACKAGE_PARENT)


def _bootstrap(code: str) -> str:
    """``code`` run after putting this very copy of asyncproc first on sys.path, installed
    or not. (Not through PYTHONPATH: workers would pass it on to what they run.)"""
    return f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); {code}"


def _high_dup(fd: int) -> int:
    # Above the target slots (3, 4): a posix_spawn dup2 can then never overwrite a source.
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def spawn_python(code: str, argv: list[str], fds: dict[int, int]) -> int:
    """posix_spawn ``python -c code argv...`` in a new session, ``fds`` mapped target->source.

    posix_spawn keeps glibc's vfork-style fast path: the cost does not grow with our RSS.
    """
    sources = {target: _high_dup(src) for target, src in fds.items()}
    try:
        actions = [(os.POSIX_SPAWN_DUP2, src, target) for target, src in sources.items()]
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-c", _bootstrap(code), *argv],
            os.environ,
            file_actions=actions,
            setsid=True,
        )
    finally:
        for src in sources.values():
            os.close(src)




def prepare_process(fault_fd: int | None, parent_pid: int, cgroup: str | None = None, die_with_parent: bool = True) -> None:
    """Isolate this fresh child: own session, own cgroup, subreaper, dies with its parent
    (unless someone else, the guardian, ends it with its tree), fault log (None: the one
    faulthandler inherited is already ours)."""
    try:
        os.setsid()
    except PermissionError:  # posix_spawn(setsid=True) already made us a leader
        pass
    if cgroup:
        _attach_cgroup(cgroup)
    if die_with_parent:
        _proctree.set_parent_death_signal(_signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    _proctree.make_subreaper()
    if fault_fd is not None:
        faulthandler.enable(file=fault_fd, all_threads=True)


def _attach_cgroup(path: str) -> None:
    # Before anything of the call runs: every process it starts is born in the cgroup and
    # ends with one cgroup.kill. Failing that (a racing removal), the scans still apply.
    try:
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # raw os calls: no file object, fewer pages copied
        finally:
            os.close(fd)
    except OSError:
        pass


def reset_inherited_signals() -> None:
    """In a forked child: no signal wake-ups into the parent's pipe (its event loop's, the
    server's), none of the parent's handlers."""
    # _signal, not signal: its wrappers turn every old handler into an enum member (or try
    # and raise), and in a freshly forked process each object touched is a page copied.
    _set_wakeup_fd(-1)
    for sig in _SERVER_SIGNALS:
        _set_handler(sig, _SIG_DFL)
    _set_handler(_SIGINT, _default_int_handler)


def _apply(spec: CallSpec) -> None:
    if spec.sys_path is not None and tuple(sys.path) != spec.sys_path:
        sys.path[:] = spec.sys_path
    if spec.cwd is not None and spec.cwd != os.getcwd():
        os.chdir(spec.cwd)
    if spec.env is not None:
        os.environ.clear()
        os.environ.update(spec.env)
    if spec.binding is not None:
        spec.binding.apply_to_current_thread()


def _limit_memory(spec: CallSpec) -> None:
    """Applied last, right before the call: the imports and arguments it needed to arrive
    are not the call's own allocations."""
    if spec.memory_limit is not None:
        # RLIMIT_DATA counts heap and private writable mappings (kernel >= 4.7) but not
        # PROT_NONE reservations such as glibc's per-thread arenas, which make RLIMIT_AS
        # fail threaded programs long before they really use the memory. The limit is
        # what the call may add: a "fork" child starts with all of its caller's memory.
        limit = _data_size() + spec.memory_limit
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _data_size() -> int:
    """This process's data segment and private writable mappings, in bytes (VmData)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmData:"):
                return int(line.split()[1]) * 1024
    return 0


# -- running and answering --------------------------------------------------------------


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module in (None, "builtins") else f"{module}.{qualname}"


def _format(exc: BaseException) -> str:
    import traceback  # only failures pay for it

    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        return f"{_type_name(type(exc))}: <traceback could not be formatted>"


def _encode_value(value: Any) -> tuple[bytes, bytes]:
    try:
        return _VALUE, dumps(value)
    except MemoryError:
        raise  # out of memory while pickling: the memory limit's outcome, not "unpicklable"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        return _protocol.UNPICKLABLE, pickle.dumps((_type_name(type(value)), reason))


# Pickling a traceback nests a few levels per frame: a deep one (a RecursionError, a
# recursive parser) would exceed the recursion limit and lose the exception's type. Its
# innermost frames are the ones that matter; the text keeps the whole story.
_MAX_PICKLED_FRAMES = 100


def _trim_tracebacks(exc: BaseException) -> None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb, depth = e.__traceback__, 0
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        tb = e.__traceback__
        for _ in range(depth - _MAX_PICKLED_FRAMES):
            assert tb is not None
            tb = tb.tb_next
        e.__traceback__ = tb
        todo += [e.__cause__, e.__context__]


def _encode_exception(exc: BaseException) -> tuple[bytes, bytes]:
    text = _format(exc)
    data: bytes | None = None
    try:
        from tblib import pickling_support

        pickling_support.install(exc)  # traceback objects (and the chain) become picklable
        try:
            data = dumps(exc)
        except Exception:  # RecursionError, or cloudpickle's PicklingError saying so
            _trim_tracebacks(exc)
            data = dumps(exc)
    except Exception:
        data = None
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    return _protocol.RAISED, pickle.dumps((_type_name(type(exc)), message, text, data, os.getpid()))


def _encode_memory_error(exc: MemoryError, limit: int) -> tuple[bytes, bytes]:
    try:
        text = _format(exc)
    except MemoryError:
        text = ""
    return _protocol.MEMORY, pickle.dumps((limit, text, os.getpid()))


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _has_children() -> bool:
    """Whether we have a child, alive or not (the usual answer: no)."""
    if _waitid is not None:  # bound by the fork server (bind_libc)
        # waitid(P_ALL, 0, NULL, WEXITED | WNOHANG | WNOWAIT | __WALL): 0 while we have a child
        # (exited or not, of any of our threads), -1 (ECHILD) once we have none. No path
        # to walk, no exception built.
        return _waitid(_ANY_CHILD) == 0
    # Else, with no other thread alive, one read of our own thread's list, by a constant
    # path: listing every thread (a directory read, a path built per thread) costs more.
    if _thread_count():  # another thread's children are on its own list
        return _proctree.own_children() != []
    try:
        fd = _open(b"/proc/thread-self/children", _O_RDONLY_CLOEXEC)
    except OSError:  # no CONFIG_PROC_CHILDREN: look the long way
        return _proctree.own_children() != []
    try:
        return _read(fd, 1) != b""
    finally:
        _close(fd)


def _flush_stdio() -> None:
    for stream in (_sys_dict.get("stdout"), _sys_dict.get("stderr")):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _end_descendants() -> None:
    """Kill and reap whatever the call left running (we are its subreaper, so it is all
    in our tree). SIGKILL: the call is over, nothing may outlive it."""
    if not _has_children():  # most calls: one read, nothing else touched
        return
    _proctree.Adopted().end(_proctree.KILL_BOUND_S)


def _finish(data: _socket.socket, tag: bytes, body: bytes, exitcode: int = 0) -> NoReturn:
    _flush_stdio()  # before answering: the caller may SIGKILL us as soon as it has the value
    try:
        if tag:
            _send(data, tag, body)
    except OSError:
        pass  # the caller is gone; nothing to answer
    _end_descendants()
    _exit(exitcode)


def _set_comm_running() -> None:
    if _prctl is not None:  # forked by the server, which bound it
        _prctl(_NAME_RUNNING)
    else:
        _proctree.set_comm("asyncproc-run")


# The usual call: no options, inline (tag, flags 0, an empty options header).
_PLAIN_CALL = _protocol.CALL + b"\0" + _SPEC_LEN.pack(0)
_PLAIN_LEN = len(_PLAIN_CALL)

# The data socket of the call this process serves. It must not be held by anything the
# call forks, or the caller would not see end-of-stream when we die: an at-fork hook
# closes it in every child. Registered once per process (the fork server registers it
# before forking any worker): registering it anew in each forked worker copied some 17
# pages per call.
_serving: _socket.socket | None = None
_hooked = False


def _close_serving() -> None:
    if _serving is not None:
        _serving.close()


def close_serving_in_forks() -> None:
    """Have every child this process forks (and their forks) close the data socket of
    the call it serves, if any."""
    global _hooked
    if not _hooked:
        os.register_at_fork(after_in_child=_close_serving)
        _hooked = True


def run_one(data: _socket.socket, job: Job | None = None, spec: CallSpec = _NO_OPTIONS,
            received: tuple[bytes, list[tuple[int, int, bytes]], int] | None = None) -> NoReturn:
    """Serve one call on ``data`` and exit: ``job`` if given, else the call received on
    ``data`` (``received``: already read, as ``recvmsg`` returned it)."""
    global _serving
    _serving = data
    close_serving_in_forks()
    try:
        if job is None:
            msg = _protocol.recv(data) if received is None else _parse(*received)
            if msg is None or msg.tag != _protocol.CALL:
                os._exit(0)  # the caller gave up before sending the call
            _set_comm_running()
            spec, payload = _decode_call(msg.body)
            if context_error is not None:
                raise context_error
            _apply(spec)
            job = pickle.loads(payload)
        else:
            _set_comm_running()
            _apply(spec)
        func, args, kwargs = job
        _limit_memory(spec)
        tag, body = _encode_value(func(*args, **kwargs))
    except BaseException as exc:
        job = None  # drop references to what filled the memory (if it did) before encoding
        _fail(data, exc, spec.memory_limit)
    _finish(data, tag, body)


def _fail(data: _socket.socket, exc: BaseException, memory_limit: int | None) -> NoReturn:
    """The call raised ``exc``: answer with it (or exit as SystemExit asks) and exit."""
    if isinstance(exc, SystemExit):
        _finish(data, b"", b"", _exit_code(exc))
    if isinstance(exc, MemoryError) and memory_limit is not None:
        _finish(data, *_encode_memory_error(exc, memory_limit))
    _finish(data, *_encode_exception(exc))


GUARDED = b"g"  # the body of a "fork" worker's go: the caller's guardian will end our tree


def forked_main(data: _socket.socket, fault_fd: int, parent_pid: int, job: Job, spec: CallSpec, cgroup: str | None) -> NoReturn:
    """Entry of a "fork" child, still holding the caller's whole state. It waits for the
    caller's go (end-of-stream: the caller died first). GUARDED: the caller's guardian
    ends our whole tree if the caller dies, so no parent-death signal, which would kill us
    first and orphan our tree beyond the guardian's reach."""
    try:
        reset_inherited_signals()
        prepare_process(fault_fd, parent_pid, cgroup, die_with_parent=False)
        go = _protocol.recv(data)
        if go is None:
            os._exit(1)
        if bytes(go.body) != GUARDED:
            _proctree.set_parent_death_signal(_signal.SIGKILL)
            if os.getppid() != parent_pid:
                os._exit(1)
        run_one(data, job, spec or _NO_OPTIONS)
    finally:
        os._exit(70)  # never return into the caller's event loop


def spawn_main() -> NoReturn:
    """Entry of a "spawn" child: ``python -c 'from asyncproc._isolated.worker import spawn_main; spawn_main()' PARENT_PID``;
    fd 3 is the data socket, fd 4 the fault log."""
    for fd in (3, 4):  # posix_spawn's dup2 made them inheritable: not for what the call execs
        os.set_inheritable(fd, False)
    prepare_process(4, int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
    run_one(_socket.socket(fileno=3))


def hello(pid: int, cgroup: str | None) -> bytes:
    """HELLO's body: the worker's pid, and its cgroup's name: with that the caller can end
    the worker's tree itself should the server die or stop."""
    return f"{pid} {os.path.basename(cgroup) if cgroup else ''}".encode()


# -- a worker forked by the fork server: its start-up and the usual call, kept lean ------
# What a forked worker does is paid by every call, and in a fresh fork every page written
# is a copy-on-write fault (3-4 us here): the cost is the pages touched, not the system
# calls. And a worker runs each of its functions once: CPython 3.11 never specializes
# them, so every ``module.name`` and ``obj.attr`` takes the generic lookup, which writes
# the name's refcount and the type's method cache: pages copied. Hence, on this path:
# functions bound to module globals below (a global is a dict read), the start-up as a
# tuple worked out in the server (ForkedStart), prctl bound in the server
# (_proctree.libc_function: about 10 pages where ctypes' usual path copies some 40).
# Measured together: some 60 pages less per call. (The functions bound to globals are at
# the top of this module.) Not LD_BIND_NOW for the server, though it saved 15 more: the
# dynamic linker reads it once, at exec, so every worker would have bound eagerly, and
# a library loaded with RTLD_LAZY that names a symbol it never calls would fail to load.

_PR_SET_PDEATHSIG, _PR_SET_NAME, _PR_SET_CHILD_SUBREAPER = 1, 15, 36
if TYPE_CHECKING:
    _PrctlArgs = tuple[int, int | bytes, int, int, int]
_PDEATHSIG_KILL: _PrctlArgs = (_PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
_SUBREAPER: _PrctlArgs = (_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
IDLE_NAME = b"asyncproc-idle"  # until the call is in (the server's _still_idle)
_NAME_IDLE: _PrctlArgs = (_PR_SET_NAME, IDLE_NAME, 0, 0, 0)
_NAME_RUNNING: _PrctlArgs = (_PR_SET_NAME, b"asyncproc-run", 0, 0, 0)


if TYPE_CHECKING:
    # The call's ctl and data sockets, the server's pid, cgroup.procs (bytes: no path
    # joining in the child), HELLO's cgroup part, the fault log and the descriptor it
    # replaces, the descriptor ranges to close, the RLIMIT_NOFILE to restore (the server
    # raised its own), if any.
    ForkedStart = tuple[_socket.socket, _socket.socket, int, bytes, bytes, int, int, tuple[tuple[int, int], ...], tuple[int, int] | None]
else:
    ForkedStart = tuple


def forked_start(ctl: _socket.socket, data: _socket.socket, server_pid: int, cgroup: str | None,
                 fault_fd: int, fault_target: int, nofile: tuple[int, int] | None) -> ForkedStart:
    """What a worker needs at start-up, worked out in the server before it forks: the
    worker keeps ``ctl``, ``data`` and its fault log (moved onto ``fault_target``), no
    other descriptor of the server."""
    procs = os.fsencode(cgroup + "/cgroup.procs") if cgroup else b""
    leaf = os.fsencode(os.path.basename(cgroup)) if cgroup else b""
    gaps, low = [], 3
    for fd in sorted((ctl.fileno(), data.fileno(), fault_target)):
        gaps.append((low, fd))
        low = fd + 1
    gaps.append((low, 1 << 20))
    return ctl, data, server_pid, procs, leaf, fault_fd, fault_target, tuple(gaps), nofile


def bind_libc() -> None:
    """In the server, before it forks workers: bind ``prctl`` for their start-up and
    ``waitid`` (if the C library has it) for ``_has_children``."""
    global _prctl, _waitid
    _waitid = _proctree.libc_function("waitid")
    call = _proctree.prctl_function()
    if call is None:  # pragma: no cover - another implementation: ctypes' usual path
        call = lambda args: int(_proctree.libc().prctl(*args))  # noqa: E731
    _prctl = call


_prctl: Callable[[_PrctlArgs], int] | None = None
_waitid: Callable[[tuple[int, ...]], int] | None = None
# __WALL: also a child made by clone() with an exit signal other than SIGCHLD.
_ANY_CHILD = (os.P_ALL, 0, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT | 0x40000000)


def warm_lookups() -> None:
    """In the server, right before it forks: look up by name what every worker will
    (flushing stdio, by type). CPython caches such lookups by type and name; one that
    misses in a worker writes the cache, a page copied per call (some 6, measured)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush  # noqa: B018 - the lookup is the point
            getattr(stream, "buffer", stream).flush  # noqa: B018


def forked_from_server(start: ForkedStart) -> NoReturn:
    """Entry of a worker forked by the server: set up, say who we are, serve one call.
    faulthandler is the server's, inherited, already writing to our fault log. The same
    guarantees as ``prepare_process``, on the lean path."""
    prctl = _prctl
    assert prctl is not None  # bound by the server before forking
    ctl, data, server_pid, procs, leaf, fault_fd, fault_target, gaps, nofile = start
    reset_inherited_signals()
    if nofile is not None:
        _setrlimit(_RLIMIT_NOFILE, nofile)
    # faulthandler, enabled in the server on fault_target, is inherited (its handlers, its
    # stack): our fault log takes that descriptor's place, and enabling it anew in each
    # worker (some 30 pages copied) is saved. Then every descriptor of the server goes:
    # the caller's lifeline, other calls' sockets, other workers' fault logs.
    _dup2(fault_fd, fault_target, False)
    for low, high in gaps:
        _closerange(low, high)
    try:
        _setsid()
    except PermissionError:  # pragma: no cover - a fork of the server never leads a group
        pass
    if procs:  # before anything of the call runs: all it starts is born there
        try:
            fd = _open(procs, _O_WRONLY_CLOEXEC)
            try:
                _write(fd, b"0")
            finally:
                _close(fd)
        except OSError:  # a racing removal: the scans still apply
            pass
    if prctl(_PDEATHSIG_KILL) != 0:
        _exit(1)
    if _getppid() != server_pid:  # the server died before the line above took effect
        _exit(1)
    prctl(_SUBREAPER)
    prctl(_NAME_IDLE)
    try:
        # Before we can read the call: from here on the caller knows the call may have run
        # and never retries it (a caller with no HELLO knows it never ran).
        ctl.send(_HELLO_FORMAT % (_getpid(), leaf))
    except OSError:
        _exit(0)  # the caller gave up on this call already
    ctl.close()
    _serve_usual(data, prctl)


def _serve_usual(data: _socket.socket, prctl: Callable[[_PrctlArgs], int]) -> NoReturn:
    """Receive the call and serve it: the usual one (no options, inline) here, anything
    else by ``run_one``."""
    global _serving
    _serving = data  # the server registered the hook (close_serving_in_forks)
    try:  # as in run_one: whatever is raised while we wait (a SIGINT) is the answer
        packet, ancillary, msg_flags, _ = _recvmsg(data, _PACKET_MAX, _ANCILLARY_SPACE, _MSG_CMSG_CLOEXEC)
        if ancillary or packet[:_PLAIN_LEN] != _PLAIN_CALL or context_error is not None:
            run_one(data, received=(packet, ancillary, msg_flags))
        prctl(_NAME_RUNNING)
        func, args, kwargs = _pickle_loads(memoryview(packet)[_PLAIN_LEN:])
        tag, body = _encode_value(func(*args, **kwargs))
    except BaseException as exc:
        _fail(data, exc, None)
    _finish(data, tag, body)
