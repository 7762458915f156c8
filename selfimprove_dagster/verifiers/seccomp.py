"""The system-call filter of a code sandbox: a classic BPF program for seccomp.

    process_filter() -> bytes | None   # for `bwrap --seccomp FD`; None on other CPUs

What it refuses (EPERM), on x86_64 and aarch64:

- creating processes: fork, vfork, clone without CLONE_THREAD (threads still work);
  clone3 answers ENOSYS so the C library falls back to clone, whose flags BPF can read.
  A fork bomb fails at its first fork, as root too (root's processes are exempt from
  RLIMIT_NPROC, whatever user namespace they are in);
- reaching other processes' memory or the kernel's key store: ptrace,
  process_vm_readv/writev, pidfd_getfd, keyctl, add_key, request_key (a session
  keyring is inherited from the judge);
- kernel surfaces a candidate has no use for: bpf, perf_event_open, userfaultfd,
  io_uring, namespaces (unshare, setns), mounts, chroot, modules, kexec, reboot, swap,
  acct, syslog, open_by_handle_at.

Any other architecture's system calls (the 32-bit ABI on x86_64, x32) kill the process.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: nr (u32), arch (u32), instruction pointer (u64), args (6 x u64)
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_CLONE_THREAD = 0x00010000

_REFUSED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "keyctl", "add_key",
    "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "unshare", "setns", "mount", "umount2",
    "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "open_by_handle_at", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "syslog",
)  # fmt: skip

# Per machine: (AUDIT_ARCH_*, system call numbers). From the kernel's unistd headers.
_ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "fork": 57,
            "vfork": 58,
            "clone": 56,
            "clone3": 435,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "pidfd_getfd": 438,
            "keyctl": 250,
            "add_key": 248,
            "request_key": 249,
            "bpf": 321,
            "perf_event_open": 298,
            "userfaultfd": 323,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "unshare": 272,
            "setns": 308,
            "mount": 165,
            "umount2": 166,
            "pivot_root": 155,
            "chroot": 161,
            "open_tree": 428,
            "move_mount": 429,
            "fsopen": 430,
            "fsconfig": 431,
            "fsmount": 432,
            "fspick": 433,
            "mount_setattr": 442,
            "open_by_handle_at": 304,
            "kexec_load": 246,
            "kexec_file_load": 320,
            "init_module": 175,
            "finit_module": 313,
            "delete_module": 176,
            "reboot": 169,
            "swapon": 167,
            "swapoff": 168,
            "acct": 163,
            "syslog": 103,
        },
    ),  # fmt: skip
    "aarch64": (
        0xC00000B7,
        {
            "clone": 220,
            "clone3": 435,
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "pidfd_getfd": 438,
            "keyctl": 219,
            "add_key": 217,
            "request_key": 218,
            "bpf": 280,
            "perf_event_open": 241,
            "userfaultfd": 282,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "unshare": 97,
            "setns": 268,
            "mount": 40,
            "umount2": 39,
            "pivot_root": 41,
            "chroot": 51,
            "open_tree": 428,
            "move_mount": 429,
            "fsopen": 430,
            "fsconfig": 431,
            "fsmount": 432,
            "fspick": 433,
            "mount_setattr": 442,
            "open_by_handle_at": 265,
            "kexec_load": 104,
            "kexec_file_load": 294,
            "init_module": 105,
            "finit_module": 273,
            "delete_module": 106,
            "reboot": 142,
            "swapon": 224,
            "swapoff": 225,
            "acct": 89,
            "syslog": 116,
        },
    ),  # fmt: skip
}


def process_filter(machine: str | None = None) -> bytes | None:
    """The filter as `struct sock_filter[]` bytes for this machine's CPU, or None where
    its system call numbers are not known here."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, numbers = arch
    program = [
        _op(_LD_W_ABS, _ARCH),
        _op(_JEQ_K, audit_arch, 1, 0),
        _op(_RET_K, _KILL_PROCESS),
        _op(_LD_W_ABS, _NR),
    ]
    if audit_arch == _ARCHES["x86_64"][0]:  # x32 system calls carry bit 30
        program += [_op(_JGE_K, 0x40000000, 0, 1), _op(_RET_K, _ERRNO | errno.EPERM)]
    for name in ("fork", "vfork", *_REFUSED):
        if name in numbers:
            program += [_op(_JEQ_K, numbers[name], 0, 1), _op(_RET_K, _ERRNO | errno.EPERM)]
    program += [
        _op(_JEQ_K, numbers["clone3"], 0, 1),
        _op(_RET_K, _ERRNO | errno.ENOSYS),
        _op(_JEQ_K, numbers["clone"], 0, 3),
        _op(_LD_W_ABS, _ARG0_LOW),  # clone's flags (low 32 bits, little-endian CPUs)
        _op(_JSET_K, _CLONE_THREAD, 1, 0),
        _op(_RET_K, _ERRNO | errno.EPERM),
        _op(_RET_K, _ALLOW),
    ]
    return b"".join(program)


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)
