"""Private APIs of dependencies that asyncproc relies on, each named and checked here, so
that an upgrade that changes one fails loudly in this file, not as a confusing failure
somewhere else (or, worse, as a feature that silently stops working).

* ``cloudpickle.cloudpickle._should_pickle_by_reference`` and
  ``_get_or_create_tracker_id`` (``_isolated.handles._track_dynamic_classes``): a class defined in
  a function comes back from a "fork" child as the same class, so ``except`` catches it.
* the bytes ``b"cloudpickle"`` in the pickle of a function sent by value, and not in one
  sent by reference (``_isolated.handles._BY_VALUE_MARK``: when to preload cloudpickle).
* CPython's ``_ctypes.dlopen``, ``_ctypes.dlsym`` and ``_ctypes.call_function``
  (``_proc.proctree.libc_function``): how the fork server binds ``prctl`` for its workers
  and calls ``malloc_trim`` without the ctypes package; without them, workers fall back to
  ctypes' usual path, correct but slower.
* ``os.environ._data`` (``_isolated.link``): the encoded environment, compared with one
  ``==`` per call to tell whether the fork server's copy is still current.
"""

from __future__ import annotations

import os
import pickle

import cloudpickle
from cloudpickle import cloudpickle as cp

from asyncproc._isolated import handles as _isolated


def make_local_class() -> type:
    class Local(Exception):
        pass

    return Local


def test_cloudpickle_tracker_ids_keep_a_class_by_value_identical() -> None:
    local = make_local_class()
    assert callable(cp._should_pickle_by_reference) and callable(cp._get_or_create_tracker_id)
    assert cp._should_pickle_by_reference(ValueError)
    assert not cp._should_pickle_by_reference(local)
    tracker = cp._get_or_create_tracker_id(local)
    assert isinstance(tracker, str) and cp._get_or_create_tracker_id(local) == tracker
    # What the tracker buys: a class sent by value comes back to its sender as itself.
    assert pickle.loads(cloudpickle.dumps(local)) is local


def test_the_by_value_mark_tells_by_value_from_by_reference() -> None:
    assert _isolated._BY_VALUE_MARK in cloudpickle.dumps(lambda: 1)
    assert _isolated._BY_VALUE_MARK not in cloudpickle.dumps(os.getpid)


def test_os_environ_data_is_the_encoded_environment() -> None:
    data = os.environ._data  # type: ignore[attr-defined]
    assert isinstance(data, dict)
    os.environ["ASYNCPROC_TEST_PRIVATE"] = "1"
    try:
        assert data[b"ASYNCPROC_TEST_PRIVATE"] == b"1"
        assert data == {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    finally:
        del os.environ["ASYNCPROC_TEST_PRIVATE"]
    assert b"ASYNCPROC_TEST_PRIVATE" not in data


def test_ctypes_private_calls_bind_a_libc_function() -> None:
    import _ctypes

    from asyncproc._proc import proctree

    assert callable(_ctypes.dlopen) and callable(_ctypes.dlsym) and callable(_ctypes.call_function)
    getpid = proctree.libc_function("getpid")
    assert getpid is not None, "the fast path through _ctypes is gone: workers use ctypes' slow path"
    assert getpid(()) == os.getpid()
    assert proctree.libc_function("no_such_function_in_libc") is None
