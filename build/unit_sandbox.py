"""Run a command under the seccomp policy a systemd unit imposes, without systemd running.

    python build/unit_sandbox.py systemd/agentspoonsd.service -- dist/agentspoonsd run ...

Reads the unit's ``SystemCallFilter=``, ``SystemCallErrorNumber=``, ``MemoryDenyWriteExecute=``
and ``RestrictAddressFamilies=`` and installs the same seccomp filters systemd would (through
libseccomp, which systemd itself uses; the syscall groups come from ``systemd-analyze
syscall-filter`` of the installed systemd), sets no_new_privs (``NoNewPrivileges=``), then execs
the command. The tests run the frozen binary this way, so a hardening line that would break the
daemon (a syscall it needs, writable-executable memory) fails in `make test`, not in production.

Not reproduced: namespaces, mounts, users and capabilities (they need a service manager); what
the tests need from them is checked by `systemd-analyze verify` and `security`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def unit_settings(path: Path) -> list[tuple[str, str]]:
    """(key, value) of every assignment in the unit's [Service] section, in order."""
    out, section = [], None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def syscall_groups() -> dict[str, list[str]]:
    """Every @group and its members (syscalls and nested @groups), from systemd-analyze."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None:
            word = line.strip()
            if word and not word.startswith("#"):
                current.append(word)
        elif not line.strip():
            current = None
    return groups


def expand(names: Iterable[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(groups[name], groups)
        else:
            out.add(name.split(":")[0])
    return out


def allowed_syscalls(settings: list[tuple[str, str]]) -> set[str] | None:
    """The allow-list SystemCallFilter= lines build, as systemd computes it; None: no filter."""
    groups = syscall_groups()
    allowed: set[str] | None = None
    for key, value in settings:
        if key != "SystemCallFilter":
            continue
        if not value:
            allowed = None
            continue
        invert = value.startswith("~")
        words = value.lstrip("~").split()
        if allowed is None:
            if invert:
                raise SystemExit("unit_sandbox: deny-list SystemCallFilter= is not supported")
            allowed = expand(["@default"], groups)  # systemd adds @default to an allow-list
        if invert:
            allowed -= expand(words, groups)
        else:
            allowed |= expand(words, groups)
    return allowed


class Seccomp:
    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        self.lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
        self.lib.seccomp_rule_add_array.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        )
        self.lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        self.lib.seccomp_release.argtypes = (ctypes.c_void_p,)

    def number(self, name: str) -> int | None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        return None if nr < 0 else nr

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]):
        """One filter: `default` action, then (action, syscall, [(arg, op, a, b)]) rules."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, name, cmps in rules:
                nr = self.number(name)
                if nr is None:
                    continue  # not a syscall on this architecture
                array = (ArgCmp * max(1, len(cmps)))(*[ArgCmp(*c) for c in cmps])
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
                if rc < 0 and rc != -errno.EEXIST:
                    raise OSError(-rc, f"seccomp_rule_add({name})")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, "seccomp_load")
        finally:
            self.lib.seccomp_release(ctx)


def apply(unit: Path) -> list[str]:
    """Install the unit's seccomp policy on this process; return what was applied."""
    settings = unit_settings(unit)
    values = {k: v for k, v in settings}
    seccomp = Seccomp()
    allowed = allowed_syscalls(settings)  # before any filter: this runs systemd-analyze
    applied = []
    if values.get("NoNewPrivileges") == "yes":
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        applied.append("NoNewPrivileges")
    if values.get("MemoryDenyWriteExecute") == "yes":
        deny = scmp_act_errno(errno.EPERM)
        wx = PROT_WRITE | PROT_EXEC
        seccomp.load(
            SCMP_ACT_ALLOW,
            [
                (deny, "mmap", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
                (deny, "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                (deny, "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                (deny, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
            ],
        )
        applied.append("MemoryDenyWriteExecute")
    families = values.get("RestrictAddressFamilies", "")
    if families and not families.startswith("~"):
        allowed_families = sorted(getattr(socket, name) for name in families.split())
        deny = scmp_act_errno(errno.EAFNOSUPPORT)
        refused = [f for f in range(allowed_families[-1]) if f not in allowed_families]
        rules = [(deny, "socket", [(0, SCMP_CMP_EQ, f, 0)]) for f in refused]
        rules.append((deny, "socket", [(0, SCMP_CMP_GT, allowed_families[-1], 0)]))
        seccomp.load(SCMP_ACT_ALLOW, rules)
        applied.append(f"RestrictAddressFamilies ({families})")
    # Last, as systemd does: the allow-list may not permit seccomp() itself.
    if allowed is not None:
        error = values.get("SystemCallErrorNumber", "")
        action = scmp_act_errno(getattr(errno, error)) if error else SCMP_ACT_KILL_PROCESS
        seccomp.load(action, [(SCMP_ACT_ALLOW, name, []) for name in sorted(allowed)])
        applied.append(f"SystemCallFilter ({len(allowed)} syscalls)")
    return applied


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: unit_sandbox.py UNIT -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    applied = apply(Path(argv[1]))
    print(f"unit_sandbox: {', '.join(applied)}", file=sys.stderr, flush=True)
    os.execvp(argv[3], argv[3:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
