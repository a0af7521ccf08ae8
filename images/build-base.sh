#!/usr/bin/env bash
# Build the shared AgentLink base image from Debian packages, without a registry:
#   debootstrap --variant=minbase <suite> + the requested packages, security updates,
#   docs/man pages/locales/apt caches and lists removed, then `docker import`.
#
# Usage: build-base.sh --image REPO:TAG [--suite bookworm] [--mirror URL]
#                      [--security-mirror URL] [--packages "python3 ..."]
#                      [--no-upgrade] [--workdir DIR]
#
# Every option is also an input of the image's content tag (see roles/images), so
# changing one gives a new tag; this script never decides whether to build.
set -euo pipefail

image=""
suite="bookworm"
mirror="http://deb.debian.org/debian"
security_mirror="http://deb.debian.org/debian-security"
packages="python3"
upgrade=1
workdir="${TMPDIR:-/var/tmp}"

usage() {
    sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --image) image="$2"; shift 2 ;;
        --suite) suite="$2"; shift 2 ;;
        --mirror) mirror="$2"; shift 2 ;;
        --security-mirror) security_mirror="$2"; shift 2 ;;
        --packages) packages="$2"; shift 2 ;;
        --no-upgrade) upgrade=0; shift ;;
        --workdir) workdir="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "build-base: unknown argument: $1" >&2; usage ;;
    esac
done

[ -n "$image" ] || { echo "build-base: --image is required" >&2; usage; }
[ "$(id -u)" -eq 0 ] || { echo "build-base: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-base: debootstrap is not installed (scripts/ensure-docker.sh installs it)" >&2; exit 1; }

mkdir -p "$workdir"
build_dir="$(mktemp -d "$workdir/agentlink-base.XXXXXX")"
rootfs="$build_dir/rootfs"
trap 'rm -rf "$build_dir"' EXIT

in_root() {
    chroot "$rootfs" /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"
}

started=$SECONDS
echo "build-base: debootstrap --variant=minbase $suite from $mirror (+ ${packages// /,})"
debootstrap --variant=minbase --include="${packages// /,}" "$suite" "$rootfs" "$mirror" \
    >"$build_dir/debootstrap.log" 2>&1 || {
    tail -n 30 "$build_dir/debootstrap.log" >&2
    exit 1
}

# Keep later package installs (builder stage, infrastructure images) as lean as this one.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/agentlink-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF
cat >"$rootfs/etc/apt/apt.conf.d/agentlink-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
EOF

if [ "$upgrade" -eq 1 ]; then
    echo "build-base: applying $suite-updates and $suite-security"
    in_root sh -c 'apt-get update -q && apt-get upgrade -y -q -o Dpkg::Options::=--force-confold' \
        >"$build_dir/upgrade.log" 2>&1 || {
        tail -n 30 "$build_dir/upgrade.log" >&2
        exit 1
    }
fi

echo "build-base: removing docs, man pages, locales, apt caches and lists"
in_root apt-get clean
find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/lintian \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/lib/dpkg/*-old "$rootfs"/var/log/apt/* "$rootfs"/var/log/*.log \
    "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/root/.cache
# Python has its own codecs; glibc's iconv modules are not used by anything in these images.
find "$rootfs"/usr/lib/*-linux-gnu/gconv -name '*.so' ! -name 'UTF-*' ! -name 'UNICODE.so' \
    ! -name 'ISO8859-1.so' -delete
: >"$rootfs/etc/machine-id"
mkdir -p "$rootfs/var/lib/apt/lists/partial" "$rootfs/var/cache/apt/archives/partial"

echo "build-base: importing $(du -sh "$rootfs" | cut -f1) as $image"
tar --numeric-owner --xattrs -C "$rootfs" \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
    docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        --message "agentlink base: debootstrap minbase $suite + $packages" \
        - "$image" >/dev/null

echo "build-base: $image built in $((SECONDS - started)) s"
