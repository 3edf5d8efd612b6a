"""The README's systemd path under a real systemd user manager (systemd as PID 1 in namespaces).

Each test boots ``/lib/systemd/systemd`` in its own PID, mount, UTS, IPC, network
and cgroup namespaces (see ``systemd_boot.py``: the root file system is an overlay
on a tmpfs, and ``/tmp``, ``/var/tmp`` and ``/run`` are fresh tmpfs mounts made
before systemd starts), creates an unprivileged user, starts its
``user@UID.service``, and as that user runs exactly what the README says. Every
command is printed, so the test log reads like a terminal session.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from systemd_boot import Machine, unavailable

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.prefix).resolve() / "bin"
README = (ROOT / "README.md").read_text()
AT_CANARY = "AT-CANARY-sd-5e1f0a"  # served to the sandbox, never logged
RT_CANARY = "RT-CANARY-sd-93b7c2"  # never leaves the store
SECRET_CANARY = "CS-CANARY-sd-07d4e6"  # the client secret, never logged
USER_ENV = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"}  # credproxy as if pipx-installed

UNAVAILABLE = unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cannot boot systemd: {UNAVAILABLE}"),
]


class User:
    """The unprivileged user in a booted machine, running commands the way the README shows."""

    def __init__(self, machine: Machine, env: dict[str, str]) -> None:
        self.machine = machine
        self.env = env

    def __call__(
        self, *argv: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* as the user, print it and its output, raise if it fails and *check*."""
        start = time.monotonic()
        proc = self.machine.run(*argv, user=True, input=input, check=False, env=self.env)
        took = time.monotonic() - start
        print(f"$ {shlex.join(argv)}    # exit {proc.returncode}, {took:.2f} s")
        for text in (proc.stdout, proc.stderr):
            if text.strip():
                print(text.rstrip())
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def start(self, *argv: str) -> subprocess.Popen[str]:
        """Start *argv* as the user without waiting (stdin is a pipe), and print it."""
        print(f"$ {shlex.join(argv)} &")
        return self.machine.popen(*argv, user=True, env=self.env)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl --user show`` properties of *unit*."""
        out = self("systemctl", "--user", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 15) -> None:
        """Poll *predicate* until it holds; fail naming *what* after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def journal_events(self) -> list[dict[str, object]]:
        """The daemon's JSON log lines from ``journalctl --user -u credproxy``."""
        out = self("journalctl", "--user", "-u", "credproxy", "--output=cat", "--no-pager")
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def events(self) -> list[object]:
        """The ``event`` names of :meth:`journal_events`, in order."""
        return [e.get("event") for e in self.journal_events()]


@pytest.fixture
def host_marker() -> Iterator[Path]:
    """A file in the host's /tmp that must outlive every boot (systemd-tmpfiles must not see it)."""
    marker = Path("/tmp") / f"credproxy-systemd-marker-{uuid.uuid4().hex}"
    marker.write_text("the host's /tmp is not the machine's /tmp\n")
    try:
        yield marker
    finally:
        marker.unlink(missing_ok=True)


@contextlib.contextmanager
def booted(tmp_path: Path, marker: Path, *extra: Path) -> Iterator[Machine]:
    """systemd booted as PID 1 with the user's manager started; the host's /tmp marker survives it."""
    machine = Machine([ROOT, Path(sys.prefix), *extra], tmp_path / "console.log")
    try:
        start = time.monotonic()
        machine.boot()
        took = time.monotonic() - start
        print(f"# systemd booted as PID 1 (host pid {machine.pid1}) in {took:.1f} s")
        unit = f"user@{machine.uid}.service"
        print(f"# systemctl start {unit}")
        machine.run("systemctl", "start", unit)
        yield machine
    finally:
        machine.shutdown()
        print(f"# systemd stopped; its console:\n{machine.console()[-2000:]}")
    assert marker.read_text() == "the host's /tmp is not the machine's /tmp\n"


@pytest.fixture
def machine(tmp_path: Path, host_marker: Path) -> Iterator[Machine]:
    """systemd booted as PID 1, the user's manager started; the host's /tmp marker survives it."""
    with booted(tmp_path, host_marker) as machine:
        yield machine


def _configure(user: User) -> None:
    """The README's "Use" steps: a provider in config.toml and an imported token."""
    user("mkdir", "-p", ".config/credproxy")
    user(
        "sh",
        "-c",
        f"echo {SECRET_CANARY} > .config/credproxy/demo.secret && cat > .config/credproxy/config.toml",
        input=(
            "[providers.demo]\n"
            'token_url = "http://127.0.0.1:9/token"\n'
            'client_id = "demo-client"\n'
            'client_secret_file = "~/.config/credproxy/demo.secret"\n'
        ),
    )
    token = {"access_token": AT_CANARY, "refresh_token": RT_CANARY, "expires_in": 3600}
    user("credproxy", "import", "demo", input=json.dumps(token))


def _enable(user: User) -> None:
    """`systemctl --user daemon-reload` and `enable --now credproxy.socket`: listening, not started."""
    user("systemctl", "--user", "daemon-reload")
    user("systemctl", "--user", "enable", "--now", "credproxy.socket")
    assert user("systemctl", "--user", "is-active", "credproxy.socket").stdout.strip() == "active"
    inactive = user("systemctl", "--user", "is-active", "credproxy.service", check=False)
    assert inactive.stdout.strip() == "inactive"


@pytest.fixture
def user(machine: Machine) -> User:
    """The user, with a provider configured, a token imported, and the README's install steps done."""
    user = User(machine, USER_ENV)
    _configure(user)
    # README, "With systemd":
    installed = user("credproxy", "install-units")
    assert "systemctl --user enable --now credproxy.socket" in installed.stdout
    under_tmp = [p for p in machine.copies if {Path("/tmp"), Path("/var/tmp")} & set(p.parents)]
    if under_tmp:
        # CI may check out (and so install) under /tmp, which PrivateTmp=yes hides from
        # the service; an installation there needs this, which a real one never does.
        paths = " ".join(map(str, under_tmp))
        print(f"# installed under /tmp: the service needs BindReadOnlyPaths={paths}")
        user("mkdir", "-p", ".config/systemd/user/credproxy.service.d")
        user(
            "sh",
            "-c",
            "cat > .config/systemd/user/credproxy.service.d/installed-under-tmp.conf",
            input=f"[Service]\nBindReadOnlyPaths={paths}\n",
        )
    _enable(user)
    return user


def _hold_session(user: User) -> subprocess.Popen[str]:
    """A `credproxy run` whose sandbox prints its token and then waits for stdin to close."""
    held = user.start(
        "credproxy", "run", "--allow", "demo", "--", "sh", "-c", "credproxy token demo && read _"
    )
    assert held.stdout is not None
    assert held.stdout.readline().strip() == AT_CANARY
    return held


def _release(held: subprocess.Popen[str]) -> None:
    stdout, stderr = held.communicate(input="\n", timeout=30)
    print(f"# the held `credproxy run` exited {held.returncode}: {stdout}{stderr}".rstrip())
    assert held.returncode == 0, stderr


def test_first_connection_activates_the_service_and_stop_keeps_the_socket(user: User) -> None:
    """After the README's install steps, `credproxy run` starts the service through the socket; status shows STATUS=, the journal holds JSON audit lines without secrets, and stop exits 0 leaving the socket listening."""
    run = user("credproxy", "run", "--allow", "demo", "--", "credproxy", "token", "demo")
    assert run.stdout.strip() == AT_CANARY
    first = user.show("credproxy.service", "ActiveState", "MainPID", "TriggeredBy")
    assert first["ActiveState"] == "active"
    assert first["TriggeredBy"] == "credproxy.socket"
    # systemd's daemon answered, not one `credproxy run` started itself (it logs to daemon.log).
    user("test", "!", "-e", f"/run/user/{user.machine.uid}/credproxy/daemon.log")
    print(f"# activated by the first connection: MainPID={first['MainPID']}")

    held = _hold_session(user)
    try:
        # STATUS= from the daemon: one session, with the renewal timer its served token started.
        expected = "1 sessions, 1 renewal timers"
        user.wait_for(
            f"STATUS={expected}",
            lambda: user.show("credproxy.service", "StatusText")["StatusText"] == expected,
        )
        status = user("systemctl", "--user", "status", "credproxy.service", "--no-pager")
        assert re.search(r"Active: active \(running\)", status.stdout)
        assert f'Status: "{expected}"' in status.stdout
        assert user.show("credproxy.service", "MainPID")["MainPID"] == first["MainPID"]

        # `systemctl --user stop` while a session and its timer exist: a clean exit 0.
        start = time.monotonic()
        user("systemctl", "--user", "stop", "credproxy.service")
        assert time.monotonic() - start < 10  # TimeoutStopSec=10s was not needed
        stopped = user.show(
            "credproxy.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus"
        )
        assert stopped == {
            "ActiveState": "inactive",
            "Result": "success",
            "ExecMainCode": "1",  # CLD_EXITED: it exited by itself rather than being killed
            "ExecMainStatus": "0",
        }
        assert (
            user("systemctl", "--user", "is-active", "credproxy.socket").stdout.strip() == "active"
        )
        user("test", "-S", f"/run/user/{user.machine.uid}/credproxy/credproxy.sock")
    finally:
        _release(held)  # its close_session connects, so the socket starts the daemon again

    again = user("credproxy", "run", "--allow", "demo", "--", "credproxy", "token", "demo")
    assert again.stdout.strip() == AT_CANARY
    restarted = user.show("credproxy.service", "ActiveState", "MainPID")
    assert restarted["ActiveState"] == "active"
    assert restarted["MainPID"] != first["MainPID"]

    # The journal: JSON audit lines (sessions, the token served by fingerprint), no secret.
    wanted = {
        "daemon_ready",
        "session_opened",
        "token_served",
        "session_closed",
        "daemon_stopping",
        "daemon_stopped",
    }
    user.wait_for(f"journal events {sorted(wanted)}", lambda: wanted <= set(user.events()))
    stopping = [e for e in user.journal_events() if e.get("event") == "daemon_stopping"]
    assert stopping[0].get("sessions") == 1  # `systemctl stop` ended the held session and its timer
    served = [e for e in user.journal_events() if e.get("event") == "token_served"]
    assert {e.get("provider") for e in served} == {"demo"}
    assert all(isinstance(e.get("fp"), str) for e in served)
    full = user("journalctl", "--user", "--output=json", "--no-pager").stdout
    assert "token_served" in full
    for canary in (AT_CANARY, RT_CANARY, SECRET_CANARY):
        assert canary not in full, canary


def test_watchdog_keeps_it_alive_and_idle_exit_hands_back_to_the_socket(user: User) -> None:
    """With a 2 s watchdog the service keeps its PID while pinging; after --idle-exit it stops cleanly, the socket stays, and the next `credproxy run` starts it again."""
    unit = user("systemctl", "--user", "cat", "credproxy.service").stdout
    (exec_start,) = re.findall(r"^ExecStart=(.*) serve --idle-exit 300$", unit, re.MULTILINE)
    # What `systemctl --user edit credproxy.service` would save: shorter timings, same unit.
    user("mkdir", "-p", ".config/systemd/user/credproxy.service.d")
    user(
        "sh",
        "-c",
        "cat > .config/systemd/user/credproxy.service.d/timing.conf",
        input=f"[Service]\nWatchdogSec=2s\nExecStart=\nExecStart={exec_start} serve --idle-exit 3\n",
    )
    user("systemctl", "--user", "daemon-reload")

    held = _hold_session(user)
    try:
        first = user.show(
            "credproxy.service", "MainPID", "WatchdogUSec", "WatchdogTimestampMonotonic"
        )
        assert first["WatchdogUSec"] == "2s"
        time.sleep(5)  # two and a half watchdog periods
        later = user.show(
            "credproxy.service", "ActiveState", "MainPID", "NRestarts", "WatchdogTimestampMonotonic"
        )
        assert later["ActiveState"] == "active"
        assert later["MainPID"] == first["MainPID"]
        assert later["NRestarts"] == "0"
        assert int(later["WatchdogTimestampMonotonic"]) > int(first["WatchdogTimestampMonotonic"])
    finally:
        _release(held)

    # No session and no connection: the daemon exits after 3 s, cleanly, and the socket remains.
    user.wait_for(
        "idle exit",
        lambda: user.show("credproxy.service", "ActiveState")["ActiveState"] == "inactive",
    )
    idle = user.show("credproxy.service", "Result", "ExecMainStatus", "NRestarts")
    assert idle == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}
    assert "idle_exit" in user.events()
    assert user("systemctl", "--user", "is-active", "credproxy.socket").stdout.strip() == "active"
    journal = user("journalctl", "--user", "-u", "credproxy", "--no-pager").stdout
    assert "watchdog timeout" not in journal.lower()

    again = user("credproxy", "run", "--allow", "demo", "--", "credproxy", "token", "demo")
    assert again.stdout.strip() == AT_CANARY
    restarted = user.show("credproxy.service", "ActiveState", "MainPID")
    assert restarted["ActiveState"] == "active"
    assert restarted["MainPID"] != first["MainPID"]


def test_online_security_analysis_matches_the_readme(user: User) -> None:
    """`systemd-analyze --user security credproxy.service`, asked of the running manager, reports the exposure the README states."""
    stated = re.search(r"`systemd-analyze security\s+--user` exposure ([0-9.]+)", README)
    assert stated is not None, "README no longer states the exposure"
    out = user("systemd-analyze", "--user", "security", "credproxy.service", "--no-pager").stdout
    match = re.search(r"Overall exposure level for credproxy\.service: ([0-9.]+)", out)
    assert match is not None, out
    assert match.group(1) == stated.group(1)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian package built from this checkout by packaging/build-deb.sh (not installed on the host)."""
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        pytest.skip("not a Debian-based system (no dpkg-deb/apt-get)")
    outdir = tmp_path_factory.mktemp("deb")
    build = subprocess.run(
        [str(ROOT / "packaging" / "build-deb.sh"), str(outdir)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TMPDIR": str(outdir)},
        check=False,
    )
    assert build.returncode == 0, build.stderr[-5000:]
    return Path(build.stdout.strip())


def test_debian_package_units_work_under_the_user_manager(
    deb: Path, tmp_path: Path, host_marker: Path
) -> None:
    """With the .deb installed in the machine, a user's `enable --now credproxy.socket` and `credproxy run` start /usr/bin/credproxy from /usr/lib/systemd/user, and stop exits 0."""
    with booted(tmp_path, host_marker, deb.parent) as machine:
        print(f"# dpkg -i {deb.name}  (inside the machine only)")
        machine.run("dpkg", "-i", str(deb), timeout=120)
        user = User(machine, {"PATH": "/usr/local/bin:/usr/bin:/bin"})
        assert user("sh", "-c", "command -v credproxy").stdout.strip() == "/usr/bin/credproxy"
        _configure(user)
        # packaging/README.md: each user opts in.
        _enable(user)

        run = user("credproxy", "run", "--allow", "demo", "--", "credproxy", "token", "demo")
        assert run.stdout.strip() == AT_CANARY
        service = user.show("credproxy.service", "ActiveState", "FragmentPath", "ExecStart")
        assert service["ActiveState"] == "active"
        assert service["FragmentPath"] == "/usr/lib/systemd/user/credproxy.service"
        assert "argv[]=/usr/bin/credproxy serve --idle-exit 300 " in service["ExecStart"]
        user.wait_for(
            "STATUS=0 sessions, 0 renewal timers",
            lambda: (
                user.show("credproxy.service", "StatusText")["StatusText"]
                == "0 sessions, 0 renewal timers"
            ),
        )

        user("systemctl", "--user", "stop", "credproxy.service")
        stopped = user.show("credproxy.service", "ActiveState", "Result", "ExecMainStatus")
        assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        assert (
            user("systemctl", "--user", "is-active", "credproxy.socket").stdout.strip() == "active"
        )
        user.wait_for("token_served in the journal", lambda: "token_served" in user.events())
        full = user("journalctl", "--user", "--output=json", "--no-pager").stdout
        for canary in (AT_CANARY, RT_CANARY, SECRET_CANARY):
            assert canary not in full, canary
