"""The fork server reuses the empty cgroups of finished calls: never one whose caller could
still end a tree by its name (a call's timeout and cancellation do), so no call is ever
killed through a name another call held."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from asyncproc import ChildCrashed
from asyncproc._proc import cgroup as _cgroup

from _children import runner, sleep_ignoring_sigterm

# Builtins and the standard library only where the calls must be quick: a worker imports
# the module of a function passed by reference (the tests' helpers weigh 100 ms).
OWN_CGROUP = Path("/proc/self/cgroup").read_text

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not _cgroup.available(), reason="no writable cgroup v2 here"),
]


async def test_the_cgroups_of_finished_calls_serve_later_ones() -> None:
    # A cgroup is free again once its call is reported and its caller has closed ctl,
    # which a caller does in sweeps (every 16 finished calls at most): how many calls
    # that takes depends on the load, hence calls until one is seen again, 200 at most.
    isolated = runner("forkserver")
    seen: list[str] = []
    while len(seen) < 200 and len(set(seen)) == len(seen):
        seen.append(await isolated.call(OWN_CGROUP))
    assert len(set(seen)) < len(seen)  # reused (what the tests below rely on)


async def test_calls_ended_by_their_cgroup_never_end_another_call() -> None:
    # Timed-out calls whose worker ignores SIGTERM: the caller SIGKILLs the tree by its
    # cgroup's name, while the server reaps, reuses cgroups and forks workers for the
    # calls beside them. Each of those must return its value.
    stopped = runner("forkserver", timeout=0.05, grace=0.01)
    quick = runner("forkserver", grace=0.01)
    failures: list[BaseException] = []

    async def stopped_call() -> None:
        with pytest.raises(TimeoutError):
            await stopped.call(sleep_ignoring_sigterm, 5)

    async def quick_calls() -> None:
        for i in range(10):
            try:
                assert await quick.call(abs, -i) == i
            except ChildCrashed as exc:
                failures.append(exc)

    async def cancelled_call() -> None:
        with anyio.move_on_after(0.03):
            await quick.call(sleep_ignoring_sigterm, 5)

    for _ in range(3):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(stopped_call)
                tg.start_soon(cancelled_call)
                tg.start_soon(quick_calls)
    assert failures == []
