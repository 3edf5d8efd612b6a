"""Boot systemd as PID 1 in throw-away namespaces, for tests that need a real service manager.

``Machine.boot()`` starts ``/lib/systemd/systemd`` in its own PID, mount, UTS,
IPC, network and cgroup namespaces (``unshare --pid --fork --mount --mount-proc``
and friends). Nothing the booted system writes reaches the host:

* the root file system is an overlay whose upper layer is a tmpfs, so ``useradd``,
  ``apt-get install``, the journal, ``/var/lib/systemd`` and ``/etc`` changes all
  vanish with the namespace;
* ``/tmp``, ``/var/tmp``, ``/run``, ``/dev`` and ``/dev/shm`` are fresh tmpfs
  mounts made *before* systemd starts (its boot-time ``systemd-tmpfiles`` would
  otherwise empty the host's ``/tmp``);
* ``/sys`` and ``/proc/sys`` are read-only, ``container=`` is set, and the network
  namespace is empty, so systemd treats it as a container and leaves the kernel,
  the clock, devices and the network alone;
* its cgroup tree is a fresh child of the caller's cgroup, removed afterwards;
* the directories the caller names (the checkout, its virtual environment) are
  copied into tmpfs mounts at the same paths, readable by every user, so an
  unprivileged user can run them without any host directory changing mode;
* if the caller dies, ``unshare`` gets SIGKILL (``setpriv --pdeathsig``), and with
  it the whole namespace.

It is stopped by SIGKILL to its PID 1 (by pid, as the host sees it), which ends
every process in the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
USER_BUS = Path("/usr/lib/systemd/user/dbus.socket")
TOOLS = ("unshare", "nsenter", "setpriv", "pivot_root", "useradd", "systemctl", "journalctl")

# Units that would only add boot time or touch things a test machine does not
# need (timers that run apt or fstrim, the host's own services, consoles).
MASKED = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "postgresql.service",
    "getty@tty1.service",
    "console-getty.service",
    "systemd-timesyncd.service",
    "systemd-pstore.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "systemd-modules-load.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-firstboot.service",
    "systemd-repart.service",
    "systemd-random-seed.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
)

# Runs as the namespace's PID 1 until it execs systemd. $1 is the user to create,
# the rest are systemd's arguments; $CP_COPY lists the directories to copy in,
# $CP_TRAVERSE the ones to make reachable, $CP_MASKED the units to mask.
BOOT_SCRIPT = r"""
set -eu
user=$1; shift
# Private scratch space first: nothing below is written to the host.
mount -t tmpfs -o mode=0755 cp-boot /run
mkdir -p /run/cp/upper /run/cp/work /run/cp/root
mount -t overlay overlay -o lowerdir=/,upperdir=/run/cp/upper,workdir=/run/cp/work /run/cp/root
R=/run/cp/root
mount -t tmpfs -o mode=1777 cp-tmp "$R/tmp"
mount -t tmpfs -o mode=1777 cp-vartmp "$R/var/tmp"
mount -t tmpfs -o mode=0755 cp-run "$R/run"
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid cp-dev "$R/dev"
for node in null zero full random urandom tty; do
    touch "$R/dev/$node"
    mount --bind "/dev/$node" "$R/dev/$node"
done
mkdir -m 0755 "$R/dev/pts" "$R/dev/mqueue"
mkdir -m 1777 "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev cp-shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
# The checkout and the virtual environment, each at its own path in a tmpfs of
# its own, readable by all (the host copies keep their modes).
for path in $CP_COPY; do
    mkdir -p "$R$path"
    mount -t tmpfs -o mode=0755 cp-copy "$R$path"
    tar -C "$path" --exclude=./.git -cf - . | tar -C "$R$path" -xf -
    chmod -R a+rX "$R$path"
done
# Every directory above those and the interpreter's prefix becomes traversable
# (in the overlay: the host's modes do not change).
for path in $CP_COPY $CP_TRAVERSE; do
    d=$path
    while [ "$d" != / ]; do d=$(dirname "$d"); chmod a+x "$R$d"; done
done
for unit in $CP_MASKED; do ln -sf /dev/null "$R/etc/systemd/system/$unit"; done
mkdir -p "$R/var/log/journal"
chroot "$R" useradd --create-home --shell /bin/sh "$user"
cd "$R"
mkdir .cp-oldroot
pivot_root . .cp-oldroot
cd /
umount -l /.cp-oldroot
rmdir /.cp-oldroot
exec env -i container=credproxy-test "$@"
"""


def unavailable() -> str | None:
    """Why systemd cannot be booted here, or None if it can."""
    if os.geteuid() != 0:
        return "booting systemd in a namespace needs root (CI runs as root)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} missing (Debian/Ubuntu package: systemd)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (packages: util-linux, passwd, systemd)"
    if not USER_BUS.exists():
        return (
            f"{USER_BUS} missing: `systemctl --user` needs the user bus (package dbus-user-session)"
        )
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy mounted: systemd 252 needs one"
    paths = (Path(__file__).resolve().parent.parent, Path(sys.prefix), Path(sys.base_prefix))
    if any(char.isspace() for path in paths for char in str(path.resolve())):
        return "the checkout or the Python installation has whitespace in its path"
    return None


def _cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def _own_cgroup2() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeError("no cgroup2 entry in /proc/self/cgroup")


class BootError(RuntimeError):
    """systemd did not come up; the message carries its console output."""


class Machine:
    """A systemd booted as PID 1 in private namespaces, with one unprivileged user."""

    def __init__(self, copies: Sequence[Path], log: Path, user: str = "cpuser") -> None:
        # Directories copied in at the same path; nested ones come with their parent.
        # The interpreter too if it lives where the machine has a fresh tmpfs.
        base = Path(sys.base_prefix).resolve()
        hidden = any(Path(d) in (base, *base.parents) for d in ("/tmp", "/var/tmp", "/run"))
        resolved = sorted({p.resolve() for p in copies} | ({base} if hidden else set()))
        self.copies = [p for p in resolved if not any(q in p.parents for q in resolved)]
        self.log_path = log
        self.user = user
        mount = _cgroup2_mount()
        assert mount is not None
        self.cgroup = mount / _own_cgroup2().lstrip("/") / f"credproxy-test-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1: int | None = None  # the namespace's PID 1, as the host sees it
        self.uid: int | None = None
        self.gid: int | None = None

    # -- life cycle ---------------------------------------------------------------

    def boot(self, timeout: float = 60) -> None:
        """Start systemd and wait until it reports the system running (or degraded)."""
        self.cgroup.mkdir()
        unshare = [
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "--propagation=private",
            "--uts",
            "--ipc",
            "--net",
            "--cgroup",
            "--kill-child=SIGKILL",
            "sh",
            "-c",
            BOOT_SCRIPT,
            "boot",
            self.user,
            str(SYSTEMD),
            "--unit=multi-user.target",
            "--log-target=console",
            "--show-status=no",
        ]
        # Enter the fresh cgroup first, so the cgroup namespace is rooted there. If
        # the test process dies, unshare gets SIGKILL, and with it the namespace.
        procs = shlex.quote(str(self.cgroup / "cgroup.procs"))
        wrapper = f"echo $$ > {procs} && exec setpriv --pdeathsig KILL {shlex.join(unshare)}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", "-c", wrapper],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                    "CP_MASKED": " ".join(MASKED),
                    "CP_COPY": " ".join(map(str, self.copies)),
                    "CP_TRAVERSE": str(Path(sys.base_prefix).resolve()),
                },
            )
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                found = children.read_text().split()
            except FileNotFoundError:
                found = []
            if found:
                self.pid1 = int(found[0])
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise BootError(f"unshare failed:\n{self.console()}")
            else:
                time.sleep(0.01)
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BootError(f"systemd did not come up (state {state!r}):\n{self.console()}")
            time.sleep(0.1)
        self.uid = int(self.run("id", "-u", self.user).stdout)
        self.gid = int(self.run("id", "-g", self.user).stdout)

    def shutdown(self) -> None:
        """Kill the namespace's PID 1 (which ends every process in it) and remove its cgroups."""
        if self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the unshare process we started
                self.proc.wait(timeout=30)
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        if not self.cgroup.exists():
            return
        deadline = time.monotonic() + 10
        for path in [
            *sorted(
                (p for p in self.cgroup.rglob("*") if p.is_dir()),
                key=lambda p: len(p.parts),
                reverse=True,
            ),
            self.cgroup,
        ]:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def console(self) -> str:
        """What systemd (and the boot script) printed so far."""
        return self.log_path.read_text(errors="replace")[-8000:]

    # -- commands -----------------------------------------------------------------

    def _enter(self) -> list[str]:
        assert self.pid1 is not None
        return ["nsenter", f"--target={self.pid1}", "--all", "--root", "--wd"]

    def command(
        self, *argv: str, user: bool = False, env: dict[str, str] | None = None
    ) -> list[str]:
        """The argv that runs *argv* inside the machine, as root or as the user (login env)."""
        if not user:
            return [*self._enter(), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *argv]
        assert self.uid is not None
        home = f"/home/{self.user}"
        environment = {
            "HOME": home,
            "USER": self.user,
            "LOGNAME": self.user,
            "SHELL": "/bin/sh",
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "XDG_RUNTIME_DIR": f"/run/user/{self.uid}",
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path=/run/user/{self.uid}/bus",
            "LANG": "C.UTF-8",
            **(env or {}),
        }
        return [
            *self._enter(),
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--inh-caps=-all",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in environment.items()),
            "sh",
            "-c",
            'cd "$HOME" && exec "$@"',
            "sh",
            *argv,
        ]

    def run(
        self,
        *argv: str,
        user: bool = False,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* in the machine and wait for it; raise if it fails and *check* is set."""
        proc = subprocess.run(
            self.command(*argv, user=user, env=env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def popen(
        self, *argv: str, user: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start *argv* in the machine without waiting; stdin is a pipe the caller closes."""
        return subprocess.Popen(
            self.command(*argv, user=user, env=env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Boot, print the state and the failed units, and shut down (a manual smoke test)."""
    import tempfile

    log = Path(tempfile.mkdtemp(prefix="cp-boot-")) / "console.log"
    machine = Machine([Path(__file__).resolve().parent.parent, Path(sys.prefix)], log)
    try:
        start = time.monotonic()
        machine.boot()
        print(f"booted in {time.monotonic() - start:.1f}s, pid1={machine.pid1}")
        print(machine.run("systemctl", "--failed", "--no-pager", check=False).stdout)
    finally:
        machine.shutdown()
        print(machine.console()[-3000:])


if __name__ == "__main__":
    main()
