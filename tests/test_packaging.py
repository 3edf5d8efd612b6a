"""The Debian package: built by packaging/build-deb.sh, installed with apt, and working.

This installs a package system-wide (and purges it afterwards), so it runs only
as root on a Debian-based machine, which is what CI provides: a throwaway VM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from credproxy.shell.units import unit_texts

ROOT = Path(__file__).resolve().parent.parent
VENV = Path("/usr/lib/credproxy/venv")
VENV_PYTHON = VENV / "bin" / "python"
USER_UNITS = Path("/usr/lib/systemd/user")

pytestmark = [
    pytest.mark.skipif(
        shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None,
        reason="not a Debian-based system (no dpkg-deb/apt-get)",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="installs the .deb system-wide: run as root (CI does)"
    ),
]


def _installed_version(package: str) -> str | None:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = result.stdout.partition(" ")
    return version if result.returncode == 0 and status == "installed" else None


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    """Build the package from this checkout, install it, and purge it afterwards."""
    if _installed_version("credproxy") is not None:
        pytest.skip("a credproxy package is already installed; not replacing it")
    outdir = Path(tempfile.mkdtemp(prefix="credproxy-deb-test-"))
    try:
        build = subprocess.run(
            [str(ROOT / "packaging" / "build-deb.sh"), str(outdir)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert build.returncode == 0, build.stderr[-5000:]
        path = Path(build.stdout.strip())
        assert path.parent == outdir
        assert path.name.endswith(".deb")
        # apt-get rather than dpkg -i, so missing dependencies get installed.
        install = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", str(path)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        try:
            yield path
        finally:
            subprocess.run(["dpkg", "--purge", "credproxy"], capture_output=True, check=True)
    finally:
        shutil.rmtree(outdir)


def _pyproject_version() -> str:
    """The version the wheel gets (pyproject.toml reads it from credproxy/_version.py)."""
    namespace: dict[str, str] = {}
    exec((ROOT / "credproxy" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def test_package_installs_the_pyproject_version(deb: Path) -> None:
    """The package and the credproxy inside its environment both carry pyproject's version."""
    version = _pyproject_version()
    assert (_installed_version("credproxy") or "").startswith(f"{version}-")
    result = subprocess.run(
        [
            str(VENV_PYTHON),
            "-c",
            'import importlib.metadata as m; print(m.version("credproxy"))',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == version


def test_credproxy_version_runs_from_usr_bin(deb: Path) -> None:
    """/usr/bin/credproxy --version runs the bundled credproxy and prints its version."""
    assert Path("/usr/bin/credproxy").resolve() == VENV / "bin" / "credproxy"
    result = subprocess.run(
        ["/usr/bin/credproxy", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"credproxy {_pyproject_version()}"


def test_user_units_start_usr_bin_credproxy(deb: Path) -> None:
    """The packaged user units are the shipped ones with ExecStart=/usr/bin/credproxy."""
    expected = unit_texts("/usr/bin/credproxy")
    for name, text in expected.items():
        assert (USER_UNITS / name).read_text() == text
    service = (USER_UNITS / "credproxy.service").read_text()
    assert "ExecStart=/usr/bin/credproxy serve --idle-exit 300\n" in service


def test_user_units_are_not_enabled(deb: Path) -> None:
    """Installing does not enable the units for every user: each user opts in."""
    wants = Path("/etc/systemd/user/sockets.target.wants/credproxy.socket")
    assert not wants.exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_installed_units_pass_systemd_analyze_verify(deb: Path) -> None:
    """systemd-analyze verify --user accepts the installed units as they are."""
    with tempfile.TemporaryDirectory(prefix="cp-run-") as runtime:
        result = subprocess.run(
            [
                "systemd-analyze",
                "verify",
                "--user",
                *(str(USER_UNITS / n) for n in unit_texts("/x")),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": runtime},
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "credproxy." in line] == []


def test_environment_works_for_an_unprivileged_user(deb: Path) -> None:
    """A non-root user can import credproxy and its dependencies from the bundled environment."""
    code = (
        "import sys, certifi, credproxy.shell.units, httpx, msgspec, platformdirs, structlog, trio;"
        "print(sys.prefix, certifi.where())"
    )
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", str(VENV_PYTHON), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    prefix, cafile = result.stdout.split()
    assert prefix == str(VENV)
    # certifi's bundle is Debian's CA store, which gets security updates.
    assert Path(cafile).resolve() == Path("/etc/ssl/certs/ca-certificates.crt").resolve()


def test_nothing_refers_to_the_build_directory(deb: Path) -> None:
    """No installed file mentions the temporary build tree (shebangs, pyvenv.cfg, .pyc paths)."""
    listing = subprocess.run(
        ["dpkg", "-L", "credproxy"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    leaks = [
        name
        for name in listing
        if name and Path(name).is_file() and not Path(name).is_symlink()
        if b"/debian/credproxy/" in Path(name).read_bytes()
    ]
    assert leaks == []
    assert not (VENV / "bin" / "pip").exists()
