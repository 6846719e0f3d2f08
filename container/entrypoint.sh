#!/bin/sh
# Entry point of the msgscript image: the first argument picks `server` or `cli`,
# every later argument goes to that command unchanged.
# MSGSCRIPT_BIN names the msgscript executable (default: msgscript on PATH).
set -eu

usage() {
	cat <<'USAGE'
usage: IMAGE server [flags]        run the function server (IMAGE server --help)
       IMAGE cli COMMAND [flags]   manage and develop scripts (IMAGE cli --help)
Mount scripts on /scripts, the working directory (the server's default -script .);
the bundled plugins are always loaded.
USAGE
}

msgscript="${MSGSCRIPT_BIN:-msgscript}"
case "${1:-}" in
server | cli)
	exec "$msgscript" "$@"
	;;
-h | --help | help)
	usage
	;;
"")
	echo "msgscript image: missing command (server or cli)" >&2
	usage >&2
	exit 2
	;;
*)
	echo "msgscript image: unknown command '$1' (use server or cli)" >&2
	usage >&2
	exit 2
	;;
esac
