#!/bin/sh
# Build the credproxy .deb (bundled virtual environment) from this checkout.
#
#   packaging/build-deb.sh [OUTDIR]
#
# Copies the checkout's files (tracked and untracked, minus what .gitignore
# ignores) to a temporary directory, adds packaging/debian/ as debian/, and runs
# dpkg-buildpackage there, so the checkout itself is never written to. The .deb
# is moved to OUTDIR (default: a new temporary directory) and its path is the
# only thing printed on stdout; the build log goes to stderr.
#
# Needs the build dependencies in packaging/debian/control; when they are
# missing and this runs as root, they are installed with apt-get (dpkg-dev
# first, then `apt-get build-dep`). The build downloads credproxy's Python
# dependencies from PyPI (or PIP_INDEX_URL); PIP_CONSTRAINT pins them.
#
# Exits non-zero, with the reason on stderr, if anything fails; the temporary
# build directory is removed either way.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
outdir=${1:-}

log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/credproxy-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src="$work/credproxy"
mkdir "$src"

# Snapshot the checkout. In a git work tree take exactly what a clean checkout
# plus uncommitted work would have (no caches, venvs or dist/); otherwise
# (an unpacked sdist) take everything.
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # --ignore-failed-read: a tracked file deleted in the work tree is skipped.
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) |
        tar -C "$src" -xf -
else
    (cd "$root" && tar --exclude=./.git -cf - .) | tar -C "$src" -xf -
fi
[ -f "$src/pyproject.toml" ] || die "no pyproject.toml in $root"
[ -d "$src/packaging/debian" ] || die "no packaging/debian in $root"
cp -R "$src/packaging/debian" "$src/debian"

# dpkg-dev provides dpkg-buildpackage and dpkg-checkbuilddeps.
if ! command -v dpkg-checkbuilddeps >/dev/null 2>&1 ||
    ! (cd "$src" && dpkg-checkbuilddeps) >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] ||
        die "missing build dependencies (see packaging/debian/control); run as root to install them"
    log "installing build dependencies"
    export DEBIAN_FRONTEND=noninteractive
    command -v dpkg-checkbuilddeps >/dev/null 2>&1 ||
        apt-get install -y --no-install-recommends dpkg-dev >&2
    apt-get build-dep -y --no-install-recommends "$src" >&2
fi

# The Debian version's upstream part must be the version pip will install.
py_version=$(sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' "$src/credproxy/_version.py" | head -n 1)
deb_version=$(cd "$src" && dpkg-parsechangelog -S Version)
case "$deb_version" in
"$py_version"-*) ;;
*) die "debian/changelog has $deb_version but credproxy/_version.py has $py_version" ;;
esac

# A developer's Python environment must not reach the build (debian/rules also
# unexports these for its own commands).
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PIP_USER PIP_TARGET PIP_PREFIX

log "building credproxy $deb_version in $work"
(cd "$src" && dpkg-buildpackage --build=binary --no-sign) >&2

set -- "$work"/credproxy_"$deb_version"_*.deb
[ -f "$1" ] || die "dpkg-buildpackage produced no credproxy_${deb_version}_*.deb"
if [ -z "$outdir" ]; then
    outdir=$(mktemp -d "${TMPDIR:-/tmp}/credproxy-dist.XXXXXX")
fi
mkdir -p "$outdir"
mv "$1" "$outdir/"
echo "$outdir/$(basename "$1")"
