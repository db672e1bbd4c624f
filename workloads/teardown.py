"""What a workload started in the guest, and how it is taken back when the workload ends early.

A workload ends early when it is cancelled (it stops at its next safe point), when its VM is destroyed
(the same), or when the guest runs out of memory (the page allocator's MemoryError, wherever it comes).
It then leaves nothing behind: every task it spawned or forked that is still alive exits (kernel.exit,
the newest first, so children go before their parents), and with them their memory, page tables and
kernel stacks; mappings it made in processes that are not its own are unmapped; other steps it took (a
DIMM plugged) are undone. Page cache its programs read stays cached, as in Linux.

A workload runs its steps inside ``with Started(kernel) as started:`` and starts tasks through it::

    parent = started.spawn(PROGRAM, system.session[-1])
    child = started.fork(parent)
    started.exit(child)  # ended on its own: nothing left to tear down

What it still holds when the block ends normally stays (memhog keep=1, idle's web server).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmdbgfs.guest.distro import Program
    from kvmdbgfs.guest.kernel import GuestKernel
    from kvmdbgfs.guest.process import Task
    from kvmdbgfs.guest.vma import Vma

TORN_DOWN = "the workload's processes and memory were torn down"


class Started:
    """The tasks, mappings and other steps of a workload not yet ended, each with how to undo it."""

    def __init__(self, kernel: GuestKernel) -> None:
        self.kernel = kernel
        self._undo: dict[int, tuple[object, Callable[[], object]]] = {}  # by id(key), in the order started

    def __enter__(self) -> Started:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """An early end: undo what was started, then let the exception go on (a MemoryError says so)."""
        if exc is None:
            return
        self.tear_down()
        if isinstance(exc, MemoryError):
            raise MemoryError(f"{exc} ({TORN_DOWN})") from exc

    def track(self, key: object, undo: Callable[[], object]) -> None:
        """Something started (``key``: the object that stands for it), which ``undo`` takes back on an early
        end."""
        self._undo[id(key)] = (key, undo)

    def ended(self, key: object) -> None:
        """What ``key`` stands for has ended on its own: there is nothing to undo for it anymore."""
        del self._undo[id(key)]

    def tear_down(self) -> None:
        """Undo everything still started, the newest first."""
        while self._undo:
            _, undo = self._undo.popitem()[1]
            undo()

    # -- tasks ----------------------------------------------------------------------------------------
    def spawn(self, program: str | Program, parent: Task) -> Task:
        """kernel.spawn, tracked (a spawn that fails leaves no task: see GuestKernel.spawn)."""
        return self._task(self.kernel.spawn(program, parent))

    def fork(self, parent: Task) -> Task:
        """kernel.fork, tracked (a fork that fails leaves no task: see GuestKernel.fork)."""
        return self._task(self.kernel.fork(parent))

    def _task(self, task: Task) -> Task:
        self.track(task, lambda: self.kernel.exit(task))
        return task

    def exit(self, task: Task) -> None:
        """kernel.exit of a task the workload started."""
        self.ended(task)
        self.kernel.exit(task)

    # -- mappings in processes the workload did not start -----------------------------------------------
    def mapped(self, task: Task, vma: Vma) -> Vma:
        """``task`` mapped ``vma`` for the workload: munmap it on an early end."""
        self.track(vma, lambda: task.munmap(vma.start, vma.end - vma.start))
        return vma

    def munmap(self, task: Task, vma: Vma) -> None:
        """The workload has ``task`` unmap ``vma`` again."""
        self.ended(vma)
        task.munmap(vma.start, vma.end - vma.start)
