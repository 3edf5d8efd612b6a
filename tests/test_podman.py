"""The README's podman recipe with a real podman: a container reaches its session.

The installed ``credproxy`` executable runs ``credproxy run --allow dev --
podman run ...`` exactly as the README writes it (only the image and the command
are the test's). The image is made here, without any registry: a root file
system holding the interpreter that runs the tests (its binary, the libraries
``ldd`` names, its standard library) and credproxy's package, imported with
``podman import``. The container has no network (``--network=none``); it asks
for a token with ``credproxy token`` and the stdlib client, and sends an HTTP
request over the session socket to the API proxy, which calls a fake API on the
host's loopback.

Podman is rootful here (the tests run as root) with runc, cgroupfs, a file
events log, private storage under the test's directory and ulimits no higher
than this process's hard limits, all set in a private ``containers.conf`` and
``storage.conf`` (``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``), so the
command line stays the README's. The image is built once per module.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from echo_upstream import configure_dev_api, echo_upstream

from conftest import Dirs, cli

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/credproxy-test:latest"
AT = "AT-PODMAN-CANARY-5d1c9e"
RT = "RT-PODMAN-CANARY-0a7b3f"
OTHER_UID = 4242

# The README's podman recipe, as a list; IMAGE and the command come after it.
RECIPE = [
    "podman",
    "run",
    "--rm",
    "--network=none",
    "-v",
    "{socket}:/run/credproxy.sock",
    "-e",
    "CREDPROXY_SOCKET=/run/credproxy.sock",
    "-e",
    "LLXPRT_CREDENTIAL_SOCKET=/run/credproxy.sock",
]

# Runs in the container: everything a tool would do, as one JSON line.
INSIDE = r"""
import http.client, json, os, socket, stat, subprocess, sys

out = {"uid": os.getuid()}
fds = (3,) if "CREDPROXY_CAPABILITY_FD" in os.environ else ()  # subprocess closes fd 3 otherwise
tok = subprocess.run(["credproxy", "token", "dev"], capture_output=True, text=True, pass_fds=fds)
out["token"] = [tok.returncode, tok.stdout.strip(), tok.stderr.strip()]
if tok.returncode == 0:
    sys.path.insert(0, "/opt/credproxy")
    from credproxy.client import Client
    with Client() as c:
        out["providers"] = c.list_providers()

    class UnixHTTP(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(os.environ["CREDPROXY_SOCKET"])

    headers = {"Authorization": "Bearer sandbox-own", "Content-Type": "application/json"}
    if fds:  # a --capability session: HTTP presents it as Proxy-Authorization
        headers["Proxy-Authorization"] = "Bearer " + os.pread(3, 64, 0).decode()
    conn = UnixHTTP("credproxy")
    conn.request("POST", "/dev/v1/echo", body=b'{"hi": 1}', headers=headers)
    r = conn.getresponse()
    out["proxied"] = [r.status, r.read().decode()]
try:
    socket.create_connection(("127.0.0.1", UPSTREAM_PORT), timeout=2).close()
    out["direct"] = "connected"
except OSError as exc:
    out["direct"] = type(exc).__name__
out["sockets"] = sorted(
    os.path.join(d, f)
    for d, _, files in os.walk("/")
    if not d.startswith(("/proc", "/sys"))
    for f in files
    if stat.S_ISSOCK(os.lstat(os.path.join(d, f)).st_mode)
)
out["host_runtime_visible"] = os.path.exists(HOST_RUNTIME)
print(json.dumps(out))
"""


@dataclass
class Podman:
    """Private podman configuration (``env``) with the test image imported."""

    env: dict[str, str]


def _podman_skip_reason() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    if shutil.which("runc") is None:
        return "runc is not installed (apt-get install runc)"
    if os.getuid() != 0:
        return "this test runs rootful podman, so it needs root (rootless podman needs /etc/subuid)"
    return None


def _put(root: Path, src: Path) -> None:
    dst = root / src.relative_to("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        shutil.copy2(src, dst)


def _build_rootfs(root: Path) -> None:
    """The running interpreter, its libraries and stdlib, credproxy, and a `credproxy` command."""
    import _socket

    exe = Path(os.path.realpath(sys.executable))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dynload = Path(_socket.__file__).parent
    skip = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo"}
    for src in (stdlib, dynload):
        if not (root / src.relative_to("/")).exists():
            shutil.copytree(
                src,
                root / src.relative_to("/"),
                ignore=lambda _d, names: [n for n in names if n in skip or n.startswith("config-")],
            )
    libs: set[str] = set()
    for binary in (exe, *dynload.glob("*.so")):
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
        libs.update(re.findall(r"(/\S+) \(0x", out.stdout))
    for lib in (exe, *map(Path, libs)):
        _put(root, lib)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    if not (root / "usr/bin/python3").exists():
        os.symlink(exe, root / "usr/bin/python3")
    shutil.copytree(
        REPO / "credproxy",
        root / "opt/credproxy/credproxy",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    command = root / "usr/local/bin/credproxy"
    command.parent.mkdir(parents=True)
    command.write_text(
        "#!/usr/bin/python3\nimport sys\nsys.path.insert(0, '/opt/credproxy')\n"
        "from credproxy.cli import main\nsys.exit(main())\n"
    )
    command.chmod(0o755)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """Private podman configuration and storage, and the test image imported into it."""
    reason = _podman_skip_reason()
    if reason:
        pytest.skip(reason)
    where = Path(tempfile.mkdtemp(prefix="cppod", dir="/tmp"))
    try:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        # Podman's default nproc (1048576) and nofile exceed root's hard limits
        # here, and without CAP_SYS_RESOURCE runc cannot raise them. conmon,
        # runc's parent, was seen with nproc at pid_max (32768), below this
        # process's hard limit, and runc failed above it: so no more than that.
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        nproc = pid_max if nproc == resource.RLIM_INFINITY else min(nproc, pid_max)
        nofile = 1_048_576 if nofile == resource.RLIM_INFINITY else nofile
        (where / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{where}/events.log"\n'
            f'tmp_dir = "{where}/libpod"\n'
        )
        (where / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{where}/graph"\n'
            f'runroot = "{where}/runroot"\n'
        )
        env = dict(
            os.environ,
            CONTAINERS_CONF=str(where / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(where / "storage.conf"),
        )
        rootfs = where / "rootfs"
        _build_rootfs(rootfs)
        with tarfile.open(where / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        imported = subprocess.run(
            ["podman", "import", str(where / "rootfs.tar"), IMAGE],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        if imported.returncode != 0:
            pytest.skip(f"podman import failed here: {imported.stderr.strip()[-300:]}")
        probe = subprocess.run(
            ["podman", "run", "--rm", "--network=none", IMAGE, "/usr/bin/python3", "-c", "pass"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
        yield Podman(env)
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """The fake API on an ephemeral loopback port (plain HTTP is allowed on loopback)."""
    with echo_upstream() as up:
        yield up


def _setup(dirs: Dirs, port: int) -> None:
    configure_dev_api(dirs, port, AT, RT)


def _run_container(
    dirs: Dirs, pm: Podman, port: int, *run_args: str, podman_args: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`credproxy run RUN_ARGS -- <the README's podman line> PODMAN_ARGS IMAGE python3 -c INSIDE`."""
    script = INSIDE.replace("UPSTREAM_PORT", str(port)).replace(
        "HOST_RUNTIME", repr(str(dirs.runtime))
    )
    argv = [*RECIPE, *podman_args, IMAGE, "/usr/bin/python3", "-c", script]
    podman_env = {k: pm.env[k] for k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}
    proc = cli(dirs, "run", *run_args, "--", *argv, timeout=120, **podman_env)
    assert RT not in proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_podman_recipe_container_gets_the_token_and_the_api(
    podman: Podman, background_daemon: Dirs, upstream: tuple[int, list[dict[str, Any]]]
) -> None:
    """The README's podman line: a container without network gets the token (`credproxy token`, the stdlib client) and the API through the proxy, and sees only its own socket."""
    dirs = background_daemon
    port, seen = upstream
    _setup(dirs, port)
    _, out = _run_container(dirs, podman, port, "--allow", "dev")
    assert (
        out["uid"] == os.getuid()
    )  # rootful podman: container root is host root, the daemon's uid
    assert out["token"] == [0, AT, ""]
    assert out["providers"] == ["dev"]
    status, body = out["proxied"]
    assert status == 200, body
    assert json.loads(body) == {"echo": '{"hi": 1}', "path": "/v1/echo"}
    (request,) = seen
    assert request["headers"]["authorization"] == f"Bearer {AT}"  # added on the host
    assert out["direct"] != "connected"  # --network=none: the socket is the only way out
    assert out["sockets"] == ["/run/credproxy.sock"]  # its own session's socket, nothing else
    assert out["host_runtime_visible"] is False  # no control socket, no other session
    log = (dirs.runtime / "daemon.log").read_text()
    assert AT not in log and RT not in log


def test_podman_container_of_another_uid_needs_allow_uid(
    podman: Podman, background_daemon: Dirs, upstream: tuple[int, list[dict[str, Any]]]
) -> None:
    """`--user 4242`: refused on a session that does not allow that uid, served on one opened with `--allow-uid 4242`."""
    dirs = background_daemon
    port, _ = upstream
    _setup(dirs, port)
    user = ("--user", f"{OTHER_UID}:{OTHER_UID}")
    _, refused = _run_container(dirs, podman, port, "--allow", "dev", podman_args=user)
    assert refused["uid"] == OTHER_UID
    code, stdout, stderr = refused["token"]
    assert (code, stdout) == (1, "")
    # The socket is 0600 for a session that allows no other uid: the kernel refuses.
    assert "cannot reach credproxy at /run/credproxy.sock: Permission denied" in stderr
    _, served = _run_container(
        dirs, podman, port, "--allow", "dev", "--allow-uid", str(OTHER_UID), podman_args=user
    )
    assert served["uid"] == OTHER_UID
    assert served["token"] == [0, AT, ""]
    assert served["proxied"][0] == 200


def test_podman_capability_descriptor_passes_with_preserve_fds(
    podman: Podman, background_daemon: Dirs, upstream: tuple[int, list[dict[str, Any]]]
) -> None:
    """`credproxy run --capability`: with `--preserve-fds 1` and the descriptor's variables, the container presents the capability; without the descriptor it is refused."""
    dirs = background_daemon
    port, _ = upstream
    _setup(dirs, port)
    fd_env = ("-e", "CREDPROXY_CAPABILITY_FD=3", "-e", "LLXPRT_CAPABILITY_FD=3")
    _, served = _run_container(
        dirs,
        podman,
        port,
        "--capability",
        "--allow",
        "dev",
        podman_args=("--preserve-fds", "1", *fd_env),
    )
    assert served["token"] == [0, AT, ""]
    assert served["proxied"][0] == 200
    _, refused = _run_container(dirs, podman, port, "--capability", "--allow", "dev")
    code, stdout, stderr = refused["token"]
    assert (code, stdout) == (4, "")
    assert "capability" in stderr, stderr
