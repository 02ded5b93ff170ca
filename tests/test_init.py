"""The package's public surface: lazy re-exports that behave like plain ones."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import asyncproc
from asyncproc import _exceptions


def test_all_names_every_export_and_each_resolves() -> None:
    assert asyncproc.__all__ == sorted(asyncproc._EXPORTS)
    for name in asyncproc.__all__:
        assert getattr(asyncproc, name) is not None
    assert asyncproc.numa.NumaOptions is asyncproc.NumaOptions


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        asyncproc.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_fork_server_stays_lean() -> None:
    # Every page the fork server holds is copied into and torn down with each worker.
    code = "import sys, asyncproc._isolated.server; print(sorted(m for m in ('anyio', 'trio', 'psutil', 'cloudpickle') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _type_checking_imports() -> dict[str, str]:
    """What the TYPE_CHECKING block of __init__.py re-exports: name -> module."""
    tree = ast.parse(Path(asyncproc.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    found = {}
    for node in block.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                found[alias.asname or alias.name] = "." + node.module
    return found


def test_static_exports_mirror_the_lazy_map() -> None:
    # _EXPORTS is the one source of truth; type checkers read the TYPE_CHECKING block, and
    # linters the literal __all__ (kept equal to _EXPORTS by the test above).
    assert _type_checking_imports() == asyncproc._EXPORTS


def test_every_export_shows_and_pickles_as_asyncproc() -> None:
    # Generic over __all__, so that a new export is checked without touching this test.
    for name in asyncproc.__all__:
        value = getattr(asyncproc, name)
        assert value.__module__ == "asyncproc", f"asyncproc.{name}.__module__ is {value.__module__!r}"
        assert value.__qualname__ == name
        assert pickle.loads(pickle.dumps(value)) is value


def test_every_export_is_documented() -> None:
    for name in asyncproc.__all__:
        value = getattr(asyncproc, name)
        doc = inspect.getdoc(value) or ""
        # A dataclass without a docstring gets its signature as one: that does not count.
        assert doc and not doc.startswith(f"{name}("), f"asyncproc.{name} has no docstring"
        if inspect.isclass(value) and not issubclass(value, BaseException):
            for attr, member in vars(value).items():
                if not attr.startswith("_") and (callable(member) or isinstance(member, property)):
                    assert inspect.getdoc(member), f"asyncproc.{name}.{attr} has no docstring"


def test_safe_call_help_says_the_default_timeout_and_what_it_raises() -> None:
    doc = inspect.getdoc(asyncproc.safe_call) or ""
    assert "timeout=5.0" in doc
    for error in ("TimeoutError", "ChildCrashed", "MemoryLimitExceeded", "RemoteError", "TypeError"):
        assert error in doc


def _all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(asyncproc.__path__, "asyncproc.")
            if not info.name.endswith(".__main__")]  # that one runs the CLI


def test_every_modules_all_lists_what_imports() -> None:
    for name in _all_modules():
        module = importlib.import_module(name)
        missing = [item for item in getattr(module, "__all__", ()) if not hasattr(module, item)]
        assert not missing, f"{name}.__all__ lists {missing}, which do not import"


def test_every_public_error_is_defined_in_exceptions() -> None:
    for name in _all_modules():
        importlib.import_module(name)
    pending, seen = [asyncproc.AsyncprocError], []
    while pending:
        cls = pending.pop()
        seen.append(cls)
        pending += cls.__subclasses__()
    public = [cls for cls in seen if not cls.__name__.startswith("_") and cls.__module__.startswith("asyncproc")]
    assert {cls.__name__ for cls in public} >= {"ChildCrashed", "NumaBindingError", "LaunchFailed"}
    for cls in public:
        # (__module__ names the public home, so ask the module itself)
        assert vars(_exceptions).get(cls.__name__) is cls, f"{cls.__name__} is defined outside _exceptions"
    assert asyncproc.numa.NumaBindingError is _exceptions.NumaBindingError
    assert issubclass(asyncproc.numa.NumaBindingError, ValueError)


def test_version_comes_from_the_installed_metadata() -> None:
    assert asyncproc.__version__ == importlib.metadata.version("asyncproc")


def test_other_platforms_get_a_clear_import_error() -> None:
    code = "import sys; sys.platform = 'darwin'; import asyncproc"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "ImportError: asyncproc runs on Linux only" in out.stderr and "'darwin'" in out.stderr
