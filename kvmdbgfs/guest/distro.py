"""What is installed in the guest: ELF objects with realistic segment sizes, and the programs of an
idle Ubuntu 22.04 server (the shared libraries each links, how much heap and stack it uses).

Sizes are KiB per segment as the dynamic loader maps them: the read-only
head (ELF header, dynsym, ...), text (r-x), rodata (r--), RELRO (rw- until
mprotect'ed read-only), data (rw-) and bss (anonymous rw-).
"""

from __future__ import annotations

from typing import Final

from dataclasses import dataclass

from kvmdbgfs.guest.vaddr import PAGE_SIZE

KIB_PER_PAGE: Final = PAGE_SIZE // 1024


@dataclass(frozen=True)
class Elf:
    """An ELF object's segments, in pages."""

    name: str
    head: int
    text: int
    rodata: int
    relro: int
    data: int
    bss: int

    @classmethod
    def kib(cls, name: str, head: int, text: int, rodata: int, relro: int, data: int, bss: int) -> Elf:
        return cls(name, *(-(-size // KIB_PER_PAGE) for size in (head, text, rodata, relro, data, bss)))

    @property
    def file_pages(self) -> int:
        return self.head + self.text + self.rodata + self.relro + self.data

    @property
    def total_pages(self) -> int:
        return self.file_pages + self.bss


# name, then KiB of: head, text, rodata, relro, data, bss
_LIBS = """
ld-linux-x86-64.so.2         4   168    44     8     8     4
libc.so.6                  160  1620   352    16     8    52
libm.so.6                   56   508   368     4     4     0
libsystemd-shared-249.so   380  1380   560    72     8     4
libsystemd.so.0             24   560   180    24     4     4
libcrypto.so.3             580  2600   840   380    16    12
libssl.so.3                128   380   120    40     4     4
libselinux.so.1             24    92    32     4     4     8
libpcre2-8.so.0             12   420   160     4     4     0
libz.so.1                   12    68    24     4     4     0
liblzma.so.5                12   120    32     4     4     0
libzstd.so.1                16   720    56     4     4     0
liblz4.so.1                  8   108    12     4     4     0
libgcrypt.so.20             56   860   280    52     4     4
libgpg-error.so.0           12    72    52     4     4     0
libcap.so.2                 12    20     8     4     4     0
libmount.so.1               40   220   100    12     4     4
libblkid.so.1               28   140    44    12     4     4
libaudit.so.1               16    44    76     4     4    40
libcap-ng.so.0               8    16     8     4     4     0
libpam.so.0                 12    40    12     4     4     0
libseccomp.so.2             12    60    72     4     4     0
libkmod.so.2                16    72    20     4     4     0
libapparmor.so.1            16    48    12     4     4     0
libcrypt.so.1               12   104    80     4     4     4
libtinfo.so.6               52    72    48    16     4     0
libdbus-1.so.3              40   220    64     8     4     0
libexpat.so.1               24   124    40     8     4     0
libgssapi_krb5.so.2         44   212    60    12     4     0
libkrb5.so.3               136   540   168    52     4     0
libk5crypto.so.3            20   132    36     4     4     0
libkrb5support.so.0         12    36    12     4     4     0
libcom_err.so.2              8     8     8     4     4     0
libkeyutils.so.1             4     8     4     4     4     0
libresolv.so.2              12    40    12     4     4     0
libwrap.so.0                 8    28     8     4     4     0
libacl.so.1                  8    20     8     4     4     0
libip4tc.so.2                8    20     8     4     4     0
libgcc_s.so.1               12    92    16     4     4     0
libnss_systemd.so.2         28   200    60     8     4     0
libglib-2.0.so.0            96   680   440     4     4     4
libgio-2.0.so.0            200  1100   380    52     4     4
libgobject-2.0.so.0         36   216    72    12     4     0
libgmodule-2.0.so.0          4     8     4     4     4     0
libffi.so.8                  8    32     8     4     4     0
libudev.so.1                16   108    32     4     4     0
libuuid.so.1                 8    16     8     4     4     0
libestr.so.0                 4     8     4     4     4     0
libfastjson.so.4             8    40     8     4     4     0
libpolkit-gobject-1.so.0    36   100    28     8     4     0
libjson-c.so.5               8    48    12     4     4     0
libnl-3.so.200              28    80    24     8     4     0
libnl-genl-3.so.200          4    12     4     4     4     0
libstdc++.so.6             600  1400   480    52     4    24
libdevmapper.so.1.02.1      32   220    60     8     4     8
libmultipath.so.0           40   240    60    12     8     4
libaio.so.1                  4     4     4     4     4     0
liburcu.so.8                 8    24     8     4     4     0
libreadline.so.8            68   168    48    16     4    12
"""
_EXES = """
systemd              44    60    40    16     4     4
systemd-journald     28    88    32     8     4     4
systemd-udevd        64   320   120    20     4     4
systemd-logind       44   200    60    12     4     4
systemd-networkd    140   760   260    40     4     4
systemd-resolved     92   420   140    28     4     4
systemd-timesyncd    16    52    20     8     4     4
dbus-daemon          40   160    48     8     4     4
sshd                120   640   200    24     8    16
agetty                8    32    12     4     4     4
cron                 12    36    12     4     4     8
bash                180   760   220    40    20    40
sh                   16    96    20     4     4     8
rsyslogd            100   440   100    20     8    20
polkitd              20    80    24     8     4     4
python3.10         1100  2800  2200   420    64   160
snapd              6000 10000  9000   400   200   300
multipathd           20    80    24     8     4     4
qemu-ga              40   260    80    12     4     4
irqbalance           12    40    12     4     4     4
atd                   8    24     8     4     4     4
udisksd              48   300    80    16     4     4
ModemManager        120   900   300    40     8     4
login                12    36    12     4     4     4
systemd-tmpfiles     28   120    40     8     4     4
udevadm              64   320   120    20     4     4
apache2             128   560   160    24    12    16
rmap_fork             4     4     4     4     4     4
memhog                4     8     4     4     4     4
make                 40   200    60     8     8    12
gcc                 120   840   300    16     8     8
cc1                3000 24000  6000   200   100   400
as                   60   560   200    16     8     8
ld                  100  1600   400    24     8    16
"""


def _parse(table: str) -> list[Elf]:
    return [Elf.kib(name, *map(int, sizes)) for name, *sizes in (line.split() for line in table.strip().splitlines())]


ELVES: dict[str, Elf] = {elf.name: elf for elf in _parse(_LIBS) + _parse(_EXES)}
LD_SO: Final = "ld-linux-x86-64.so.2"

_SYSTEMD = [
    "libsystemd-shared-249.so",
    "libc.so.6",
    "libseccomp.so.2",
    "libselinux.so.1",
    "libmount.so.1",
    "libpam.so.0",
    "libaudit.so.1",
    "libkmod.so.2",
    "libapparmor.so.1",
    "libcap.so.2",
    "libcrypt.so.1",
    "libgcrypt.so.20",
    "libip4tc.so.2",
    "liblz4.so.1",
    "libcrypto.so.3",
    "liblzma.so.5",
    "libzstd.so.1",
    "libacl.so.1",
    "libblkid.so.1",
    "libcap-ng.so.0",
    "libgpg-error.so.0",
    "libpcre2-8.so.0",
]
_LIBSYSTEMD = [
    "libsystemd.so.0",
    "liblzma.so.5",
    "libzstd.so.1",
    "liblz4.so.1",
    "libcap.so.2",
    "libgcrypt.so.20",
    "libgpg-error.so.0",
]
_GLIB = [
    "libglib-2.0.so.0",
    "libgio-2.0.so.0",
    "libgobject-2.0.so.0",
    "libgmodule-2.0.so.0",
    "libffi.so.8",
    "libpcre2-8.so.0",
    "libz.so.1",
    "libmount.so.1",
    "libselinux.so.1",
    "libblkid.so.1",
    "libc.so.6",
]
_PYTHON = ["libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1"]
_KRB = [
    "libgssapi_krb5.so.2",
    "libkrb5.so.3",
    "libk5crypto.so.3",
    "libcom_err.so.2",
    "libkrb5support.so.0",
    "libkeyutils.so.1",
    "libresolv.so.2",
]


@dataclass(frozen=True)
class Program:
    """A program: its executable and libraries, and how much memory it touches.

    ``text_frac`` is the fraction of each object's text windows it executes;
    ``heap_kib`` is brk heap written, ``anon_kib`` anonymous mmap memory written,
    ``stack_kib`` stack written; a daemon wakes every ``wake_period`` seconds
    (0: never) and then touches ``wake_kib`` of its heap; one run of it computes for ``cpu_ms`` of user time
    (what it does besides faulting its memory in: a compiler's parsing and code generation)."""

    name: str
    exe: str
    libs: tuple[str, ...]
    heap_kib: int = 256
    anon_kib: int = 0
    stack_kib: int = 16
    text_frac: float = 0.3
    wake_period: float = 0.0
    wake_kib: int = 16
    threads: int = 0  # besides the main thread
    cpu_ms: float = 0.0


def _program(name: str, exe: str, libs: list[str], **kw: float) -> Program:
    unique = list(dict.fromkeys(["libc.so.6", *libs]))
    return Program(name, exe, tuple(unique), **kw)  # type: ignore[arg-type]


PROGRAMS: dict[str, Program] = {
    p.name: p
    for p in [
        _program(
            "systemd", "systemd", _SYSTEMD, heap_kib=6144, stack_kib=64, text_frac=0.45, wake_period=5, wake_kib=64
        ),
        _program(
            "systemd-journald",
            "systemd-journald",
            _SYSTEMD,
            heap_kib=2048,
            anon_kib=1024,
            text_frac=0.3,
            wake_period=1,
            wake_kib=64,
        ),
        _program("systemd-udevd", "systemd-udevd", _SYSTEMD, heap_kib=3072, text_frac=0.35, wake_period=10),
        _program("systemd-logind", "systemd-logind", _SYSTEMD, heap_kib=1024, text_frac=0.25, wake_period=30),
        _program("systemd-networkd", "systemd-networkd", _SYSTEMD, heap_kib=1536, text_frac=0.25, wake_period=15),
        _program("systemd-resolved", "systemd-resolved", _SYSTEMD, heap_kib=2048, text_frac=0.25, wake_period=5),
        _program("systemd-timesyncd", "systemd-timesyncd", _SYSTEMD, heap_kib=768, text_frac=0.2, wake_period=32),
        _program(
            "dbus-daemon",
            "dbus-daemon",
            [
                "libdbus-1.so.3",
                "libexpat.so.1",
                "libapparmor.so.1",
                "libaudit.so.1",
                "libcap-ng.so.0",
                "libselinux.so.1",
                "libpcre2-8.so.0",
                *_LIBSYSTEMD,
            ],
            heap_kib=1536,
            text_frac=0.25,
            wake_period=2,
        ),
        _program(
            "sshd",
            "sshd",
            [
                "libcrypto.so.3",
                "libwrap.so.0",
                "libaudit.so.1",
                "libpam.so.0",
                "libselinux.so.1",
                "libz.so.1",
                "libcrypt.so.1",
                "libcap-ng.so.0",
                "libpcre2-8.so.0",
                *_KRB,
                *_LIBSYSTEMD,
            ],
            heap_kib=1024,
            text_frac=0.2,
        ),
        _program("agetty", "agetty", [], heap_kib=64, text_frac=0.15),
        _program(
            "cron",
            "cron",
            ["libselinux.so.1", "libpam.so.0", "libaudit.so.1", "libcap-ng.so.0", "libpcre2-8.so.0"],
            heap_kib=128,
            text_frac=0.15,
            wake_period=60,
        ),
        _program("bash", "bash", ["libtinfo.so.6"], heap_kib=1024, text_frac=0.3),
        _program(
            "apache2",
            "apache2",
            ["libpcre2-8.so.0", "libcrypt.so.1", "libexpat.so.1", "libz.so.1", "libcrypto.so.3"],
            heap_kib=4096,
            text_frac=1.0,
            wake_period=10,
            wake_kib=64,
        ),
        _program("sh", "sh", [], heap_kib=64, text_frac=0.3),
        _program(
            "rsyslogd",
            "rsyslogd",
            ["libz.so.1", "libestr.so.0", "libfastjson.so.4", "libuuid.so.1", *_LIBSYSTEMD],
            heap_kib=1024,
            anon_kib=2048,
            text_frac=0.2,
            wake_period=5,
            threads=3,
        ),
        _program(
            "polkitd",
            "polkitd",
            ["libpolkit-gobject-1.so.0", "libexpat.so.1", "libsystemd.so.0", *_GLIB],
            heap_kib=2048,
            text_frac=0.2,
            wake_period=30,
            threads=2,
        ),
        _program("networkd-dispatcher", "python3.10", _PYTHON, heap_kib=8192, anon_kib=4096, text_frac=0.25),
        _program("unattended-upgr", "python3.10", _PYTHON, heap_kib=12288, anon_kib=4096, text_frac=0.25, threads=1),
        _program(
            "snapd",
            "snapd",
            [],
            heap_kib=512,
            anon_kib=16384,
            stack_kib=32,
            text_frac=0.15,
            wake_period=10,
            wake_kib=256,
            threads=8,
        ),
        _program(
            "multipathd",
            "multipathd",
            [
                "libmultipath.so.0",
                "libdevmapper.so.1.02.1",
                "libudev.so.1",
                "libaio.so.1",
                "liburcu.so.8",
                "libsystemd.so.0",
                "libreadline.so.8",
                "libjson-c.so.5",
            ],
            heap_kib=1024,
            anon_kib=2048,
            text_frac=0.2,
            wake_period=1,
            threads=6,
        ),
        _program("qemu-ga", "qemu-ga", _GLIB, heap_kib=512, text_frac=0.15, wake_period=5),
        _program(
            "irqbalance",
            "irqbalance",
            [*_GLIB, "libcap-ng.so.0", "libnl-3.so.200", "libnl-genl-3.so.200"],
            heap_kib=512,
            text_frac=0.15,
            wake_period=10,
            threads=1,
        ),
        _program("atd", "atd", ["libpam.so.0", "libselinux.so.1", "libpcre2-8.so.0"], heap_kib=64, text_frac=0.1),
        _program(
            "udisksd",
            "udisksd",
            [*_GLIB, "libpolkit-gobject-1.so.0", "libsystemd.so.0", "libudev.so.1", "libstdc++.so.6", "libgcc_s.so.1"],
            heap_kib=2048,
            text_frac=0.2,
            wake_period=600,
            threads=4,
        ),
        _program(
            "ModemManager",
            "ModemManager",
            [*_GLIB, "libudev.so.1", "libsystemd.so.0", "libgcc_s.so.1"],
            heap_kib=1536,
            text_frac=0.15,
            threads=2,
        ),
        _program("login", "login", ["libpam.so.0", "libaudit.so.1", "libcap-ng.so.0"], heap_kib=128, text_frac=0.2),
        _program("systemd-tmpfiles", "systemd-tmpfiles", _SYSTEMD, heap_kib=512, text_frac=0.2),
        _program("udevadm", "udevadm", _SYSTEMD, heap_kib=256, text_frac=0.15),
    ]
}

# An idle Ubuntu server after boot with one SSH login: (program, instances).
IDLE_SERVICES: list[tuple[str, int]] = [
    ("systemd-journald", 1),
    ("multipathd", 1),
    ("systemd-udevd", 1),
    ("systemd-networkd", 1),
    ("systemd-resolved", 1),
    ("systemd-timesyncd", 1),
    ("dbus-daemon", 1),
    ("networkd-dispatcher", 1),
    ("polkitd", 1),
    ("rsyslogd", 1),
    ("snapd", 1),
    ("systemd-logind", 1),
    ("udisksd", 1),
    ("ModemManager", 1),
    ("cron", 1),
    ("atd", 1),
    ("irqbalance", 1),
    ("qemu-ga", 1),
    ("unattended-upgr", 1),
    ("agetty", 2),
    ("sshd", 1),
]
# Short-lived helpers that ran during boot (generators, udev rule programs, tmpfiles, shell scripts).
BOOT_HELPERS: list[tuple[str, int]] = [("systemd-tmpfiles", 3), ("udevadm", 6), ("sh", 12)]
# The user's session: systemd --user, sshd's privilege-separated children, a shell.
SESSION: list[str] = ["sshd", "sshd", "systemd", "bash"]
KTHREADS_GLOBAL = [
    "kthreadd",
    "rcu_gp",
    "rcu_par_gp",
    "slub_flushwq",
    "netns",
    "mm_percpu_wq",
    "rcu_tasks_kthread",
    "rcu_tasks_rude_kthread",
    "rcu_tasks_trace_kthread",
    "rcu_sched",
    "kdevtmpfs",
    "inet_frag_wq",
    "kauditd",
    "khungtaskd",
    "oom_reaper",
    "writeback",
    "kcompactd0",
    "ksmd",
    "khugepaged",
    "kintegrityd",
    "kblockd",
    "blkcg_punt_bio",
    "tpm_dev_wq",
    "ata_sff",
    "md",
    "edac-poller",
    "devfreq_wq",
    "watchdogd",
    "kswapd0",
    "ecryptfs-kthread",
    "kthrotld",
    "acpi_thermal_pm",
    "scsi_eh_0",
    "scsi_tmf_0",
    "scsi_eh_1",
    "scsi_tmf_1",
    "vfio-irqfd-cleanup",
    "mld",
    "ipv6_addrconf",
    "kstrp",
    "zswap-shrink",
    "charger_manager",
    "jbd2/vda1-8",
    "ext4-rsv-conver",
    "cryptd",
    "raid5wq",
    "kaluad",
    "kmpath_rdacd",
    "kmpathd",
    "kmpath_handlerd",
    "iprt-VBoxWQ",
    "ttm_swap",
    "card0-crtc0",
    "irq/24-virtio0",
    "kworker/u4:0",
    "kworker/u4:1",
    "kworker/u4:2",
    "kworker/u5:0",
    "psimon",
    "hwrng",
    "loop0",
    "loop1",
    "loop2",
    "loop3",
]
KTHREADS_GLOBAL += [
    f"kworker/R-{wq}"
    for wq in (  # workqueue rescuers (v6.9+ names them)
        "rcu_g",
        "rcu_p",
        "slub_",
        "netns",
        "mm_pe",
        "inet_",
        "kbloc",
        "blkcg",
        "tpm_d",
        "ata_s",
        "md",
        "md_bi",
        "edac-",
        "devfr",
        "watch",
        "kthro",
        "acpi_",
        "mld",
        "ipv6_",
        "kstrp",
        "crypt",
        "charg",
        "ext4-",
        "raid5",
        "kmpat",
        "kmpat_",
        "kalua",
        "ttm",
        "nvme-",
        "scsi_",
    )
]
KTHREADS_PER_CPU: Final = [
    "cpuhp/{}",
    "migration/{}",
    "idle_inject/{}",
    "ksoftirqd/{}",
    "kworker/{}:0",
    "kworker/{}:0H",
    "kworker/{}:1",
    "kworker/{}:1H",
    "kworker/{}:2",
]
