#!/bin/sh
# Makes a local base image for the Containerfile from Debian packages, for machines that reach
# no image registry (the test suite builds the msgscript image on it):
#   debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm ROOTFS MIRROR
#   tar -C ROOTFS -c . | podman import - localhost/msgscript-base:bookworm
# then: podman build --build-arg BASE=localhost/msgscript-base:bookworm -f Containerfile .
#
# The root filesystem is cached outside the checkout as a tarball (about 130 MB), in
# $MSGSCRIPT_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/msgscript. The first run takes about
# a minute on 2 cores (debootstrap downloads and unpacks about 45 MB of packages: 45 s measured,
# up to 2 min on a busy machine or a slow mirror); later runs only import the tarball (about
# 5 s), or do nothing when the image is already in podman's storage.
# The tarball is made again when it is older than $MSGSCRIPT_BASE_MAX_AGE_DAYS days (30), so that
# Debian's updates reach it.
#
# Usage: container/make-base.sh [--rebuild] [IMAGE]      prints the image name
# Environment: MSGSCRIPT_CACHE; DEBIAN_MIRROR (default: this machine's apt mirror for bookworm,
# from /etc/apt/sources.list*, else http://deb.debian.org/debian); CONTAINERS_CONF and
# CONTAINERS_STORAGE_CONF choose podman's storage as usual. The first run needs root (or sudo)
# and the Debian package debootstrap.
set -eu

rebuild=
case "${1:-}" in
-h | --help)
	awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
	exit 0
	;;
--rebuild)
	rebuild=1
	shift
	;;
esac
image="${1:-localhost/msgscript-base:bookworm}"
suite=bookworm
cache="${MSGSCRIPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/msgscript}"
tarball="$cache/base-$suite.tar"
max_age="${MSGSCRIPT_BASE_MAX_AGE_DAYS:-30}"

log() { printf '[make-base] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# The first URI of an apt source (one-line .list or deb822 .sources) that carries $suite.
apt_mirror() {
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -r "$f" ] || continue
		awk -v s="$suite" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
			if ($(i + 1) == s) { print $i; exit } }' "$f"
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -r "$f" ] || continue
		awk -v s="$suite" 'BEGIN { RS = "" } {
			uri = ""; ok = 0; deb = 0
			n = split($0, lines, "\n")
			for (j = 1; j <= n; j++) {
				split(lines[j], w, /[ \t]+/)
				if (w[1] == "Types:" && lines[j] ~ /[ \t]deb([ \t]|$)/) deb = 1
				if (w[1] == "URIs:") uri = w[2]
				if (w[1] == "Suites:") for (k = 2; k in w; k++) if (w[k] == s) ok = 1
			}
			if (deb && ok && uri != "") { print uri; exit }
		}' "$f"
	done
}

mkdir -p "$cache"
# One maker at a time; a second run waits and then finds the tarball.
if command -v flock >/dev/null; then
	exec 9>"$cache/make-base.lock"
	flock 9
fi

if [ -n "$rebuild" ] || [ ! -s "$tarball" ] || [ -n "$(find "$tarball" -mtime +"$max_age" 2>/dev/null)" ]; then
	command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] ||
		{ log "debootstrap is not installed (Debian package debootstrap)"; exit 1; }
	mirror="${DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}"
	mirror="${mirror:-http://deb.debian.org/debian}"
	rootfs="$cache/rootfs.$$"
	trap 'as_root rm -rf "$rootfs"; rm -f "$tarball.$$"' EXIT
	log "debootstrap $suite from $mirror (about a minute)"
	start=$(date +%s)
	as_root env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase \
		--include=python3,python3-venv,ca-certificates "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
		{ tail -n 20 "$cache/debootstrap.log" >&2; log "debootstrap failed (log: $cache/debootstrap.log)"; exit 1; }
	# What an image does not need: downloaded packages, package lists, documentation, locales.
	# shellcheck disable=SC2016 # $1 is expanded by the inner shell
	as_root sh -c 'cd "$1" && rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
		usr/share/doc/* usr/share/man/* usr/share/info/* usr/share/locale/* var/log/*.log' sh "$rootfs"
	as_root tar --numeric-owner -C "$rootfs" -cf - . >"$tarball.$$"
	mv "$tarball.$$" "$tarball"
	log "made $tarball in $(($(date +%s) - start)) s"
	rebuild=1
fi

# The image carries the tarball's time as a label: a tarball made since (by a run on another
# podman storage) is imported again.
stamp=$(date -r "$tarball" +%s)
have=$(podman image inspect --format '{{index .Labels "msgscript.base.stamp"}}' "$image" 2>/dev/null || true)
if [ -n "$rebuild" ] || [ "$have" != "$stamp" ]; then
	log "podman import $tarball $image"
	podman import --quiet --change "LABEL msgscript.base.stamp=$stamp" \
		--message "debootstrap --variant=minbase $suite with python3" "$tarball" "$image" >/dev/null
fi
echo "$image"
