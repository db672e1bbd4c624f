"""The idle system's user space: SSH logins at boot, and server processes that have handled requests."""

from __future__ import annotations

from test_guest_helpers import small_kernel, user_pte

from kvmdbgfs.guest import userspace
from kvmdbgfs.guest.distro import PROGRAMS
from kvmdbgfs.guest.process import Task

LOGIN = ["sshd", "sshd", "systemd", "systemd", "bash"]  # sshd's two forks, systemd --user and (sd-pam), a shell


def test_each_login_has_its_own_sshd_pair_user_manager_and_shell() -> None:
    kernel = small_kernel(512 << 20)
    system = userspace.boot(kernel, services=[("sshd", 1)], helpers=[], logins=2)
    assert [task.program for task in system.session] == LOGIN * 2
    listener = system.services[0]
    for first in (0, len(LOGIN)):
        priv, user, manager, sd_pam, shell = system.session[first : first + len(LOGIN)]
        assert priv.parent is listener and user.parent is priv  # forks without exec of the listener
        assert manager.parent is system.init and sd_pam.parent is manager
        assert shell.parent is user and shell.mm is not user.mm
    assert system.session[-1].program == "bash"  # what the other workloads start their processes from


def mapped(kernel, task: Task, vas) -> set[int]:  # type: ignore[no-untyped-def]
    return {int(va) for va in vas if user_pte(kernel, task, int(va))}


def test_a_server_that_served_more_ran_more_of_its_code_hottest_first() -> None:
    kernel = small_kernel(512 << 20)
    system = userspace.boot(kernel, services=[("cron", 1)], helpers=[], logins=1)
    parent = system.services[0]
    light, busy = kernel.fork(parent), kernel.fork(parent)
    userspace.serve(light, 0.2)
    userspace.serve(busy, 1.0)
    frac = PROGRAMS["cron"].text_frac
    for obj_light, obj_busy in zip(light.objects, busy.objects):
        hot_light = kernel.hot_pages(obj_light, "text", frac * 0.2)
        hot_busy = kernel.hot_pages(obj_busy, "text", frac)
        assert set(hot_light.tolist()) <= set(hot_busy.tolist())  # the same windows, hottest first
        assert mapped(kernel, light, hot_light) == set(hot_light.tolist())
        assert mapped(kernel, busy, hot_busy) == set(hot_busy.tolist())
    text = [va for obj in busy.objects for va in obj.pages("text").tolist()]
    assert len(mapped(kernel, busy, text)) > len(mapped(kernel, light, text))
