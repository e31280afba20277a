#!/usr/bin/env bash
# install-consumer: installs this build into a scratch DESTDIR, checks what landed where, verifies
# the systemd units, and builds and runs a C++ and a C worker against the installed tree alone.
# meson test passes the paths and tools in the environment (see meson.build beside this file).
# A check whose tool is missing (systemd-analyze, man, groff) is left out, and once every other
# check has passed the script exits 77, meson's SKIP, naming it: never a pass. scripts/test
# installs the tools (TEST_DEPS in scripts/lib.sh).
set -euo pipefail

me=install-consumer
for v in MESON BUILD_ROOT HERE PREFIX BINDIR SBINDIR LIBDIR INCLUDEDIR SYSCONFDIR DATADIR MANDIR CC CXX; do
	if [[ -z "${!v:-}" ]]; then
		echo "$me: $v is not set; run this through meson test" >&2
		exit 2
	fi
done
read -ra cc <<<"$CC"
read -ra cxx <<<"$CXX"
read -ra sanitize <<<"${SANITIZE_FLAGS:-}"

fail() {
	echo "$me: FAIL: $*" >&2
	exit 1
}
step() {
	echo "== $*"
}

# meson points LD_LIBRARY_PATH at the build's libbroker-client; everything here must use the
# installed one.
unset LD_LIBRARY_PATH

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dest="$work/dest"

step "meson install --destdir (prefix $PREFIX)"
"$MESON" install -C "$BUILD_ROOT" --destdir "$dest" --no-rebuild --quiet || fail "meson install failed"

step "every part is installed where the prefix says"
expect=(
	"$SBINDIR/brokerd" "$BINDIR/brokerctl"
	"$BINDIR/broker-example-http" "$BINDIR/broker-example-c" "$BINDIR/broker-example-python"
	"$LIBDIR/libbroker-client.so.0" "$LIBDIR/libbroker-client.so" "$LIBDIR/pkgconfig/broker-client.pc"
	"$INCLUDEDIR/broker/client.hpp" "$INCLUDEDIR/broker/client.h"
	"$SYSCONFDIR/brokerd/brokerd.json"
	"$DATADIR/brokerd/io.brokerd.Control.varlink" "$DATADIR/brokerd/io.brokerd.Worker.varlink"
	"$MANDIR/man8/brokerd.8" "$MANDIR/man1/brokerctl.1" "$MANDIR/man5/brokerd.json.5"
	"$MANDIR/man3/libbroker-client.3"
	"$DATADIR/bash-completion/completions/brokerctl"
)
for f in "${expect[@]}"; do
	[[ -e "$dest$f" ]] || fail "$f was not installed"
done
for f in "$SBINDIR/brokerd" "$BINDIR/brokerctl" "$BINDIR/broker-example-http" "$BINDIR/broker-example-python"; do
	[[ -x "$dest$f" ]] || fail "$f is not executable"
done
mapfile -t units < <(find "$dest" -path '*/systemd/system/brokerd.service')
((${#units[@]} == 1)) || fail "expected one brokerd.service under a systemd/system directory, found ${#units[@]}"
unit="${units[0]}"
echo "unit: ${unit#"$dest"}"
socket_unit="$(dirname "$unit")/brokerd.socket"
[[ -f "$socket_unit" ]] || fail "brokerd.socket is not installed beside brokerd.service"

step "only the public headers, and they include nothing private"
extra="$(find "$dest$INCLUDEDIR/broker" -mindepth 1 ! -name client.hpp ! -name client.h)"
[[ -z "$extra" ]] || fail "headers besides client.hpp and client.h are installed: $extra"
while IFS= read -r line; do
	header="$(sed -E 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"]([^>"]+)[>"].*/\1/' <<<"${line#*:}")"
	case "$header" in
	*internal*) fail "an installed header includes a private one: $line" ;;
	broker/*) [[ -e "$dest$INCLUDEDIR/$header" ]] || fail "an installed header includes an uninstalled one: $line" ;;
	esac
done < <(grep -H -E '^[[:space:]]*#[[:space:]]*include' "$dest$INCLUDEDIR"/broker/*)

step "the installed programs run, and the example configuration is valid"
version="$("$dest$SBINDIR/brokerd" --version)" && [[ "$version" == "brokerd "* ]] ||
	fail "installed brokerd --version"
version="$("$dest$BINDIR/brokerctl" --version)" && [[ "$version" == "brokerctl "* ]] ||
	fail "installed brokerctl --version"
"$dest$SBINDIR/brokerd" --check-config "$dest$SYSCONFDIR/brokerd/brokerd.json" ||
	fail "brokerd --check-config rejects the installed example configuration"
grep -qxF "ExecStart=$SBINDIR/brokerd --config $SYSCONFDIR/brokerd/brokerd.json" "$unit" ||
	fail "brokerd.service does not run $SBINDIR/brokerd with $SYSCONFDIR/brokerd/brokerd.json"
# As installed it runs nothing (a package ships no worker); its commented-out example must stay
# valid and run the installed example worker once uncommented.
sed -E '/"sockets": \{/,$ s#^( *)// ("|  |\})#\1\2#' "$dest$SYSCONFDIR/brokerd/brokerd.json" >"$work/example.json"
grep -qF "\"exec\": [\"$BINDIR/broker-example-http\"]" "$work/example.json" ||
	fail "the example configuration's commented-out service does not run $BINDIR/broker-example-http"
"$dest$SBINDIR/brokerd" --check-config "$work/example.json" >/dev/null ||
	fail "brokerd --check-config rejects the example configuration's commented-out service"

skipped=()
step "systemd-analyze verify: the installed service and socket units"
if command -v systemd-analyze >/dev/null; then
	# The programs the unit runs are checked in the DESTDIR, where they are now; the man pages of
	# Documentation= too, through MANPATH.
	mkdir "$work/units"
	sed -e "s|=$SBINDIR/|=$dest$SBINDIR/|" -e "s|=$BINDIR/|=$dest$BINDIR/|" "$unit" >"$work/units/brokerd.service"
	cp "$socket_unit" "$work/units/brokerd.socket"
	man_check=(--man=yes)
	if ! command -v man >/dev/null; then
		man_check=(--man=no)
		skipped+=("the man pages named by Documentation= (no man here: Debian package man-db)")
	fi
	# systemd-analyze exits 0 on warnings such as an unknown key, so any output is a failure.
	if ! out="$(MANPATH="$dest$MANDIR" systemd-analyze verify "${man_check[@]}" \
		"$work/units/brokerd.service" "$work/units/brokerd.socket" 2>&1)" || [[ -n "$out" ]]; then
		fail "systemd-analyze verify:"$'\n'"$out"
	fi
else
	skipped+=("systemd-analyze verify of the units (no systemd-analyze here: Debian package systemd)")
fi

step "man pages render without warnings"
if command -v groff >/dev/null; then
	for page in man8/brokerd.8 man1/brokerctl.1 man5/brokerd.json.5 man3/libbroker-client.3; do
		out="$(groff -man -Tutf8 -ww -z "$dest$MANDIR/$page" 2>&1)" || fail "groff $page: $out"
		[[ -z "$out" ]] || fail "groff $page:"$'\n'"$out"
	done
else
	skipped+=("man page rendering (no groff here: Debian package groff-base)")
fi

step "a C++ and a C worker build against the installed tree with pkg-config"
export PKG_CONFIG_PATH="$dest$LIBDIR/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$dest"
read -ra flags <<<"$(pkg-config --cflags --libs broker-client)"
[[ " ${flags[*]} " == *" -I$dest$INCLUDEDIR "* ]] || fail "pkg-config --cflags does not point into the DESTDIR: ${flags[*]}"
# No -std: a consumer gets its compiler's default. Nothing from this source tree is on the path.
"${cxx[@]}" "${sanitize[@]}" -Wall -Wextra -Werror -o "$work/consumer-cpp" "$HERE/consumer.cpp" "${flags[@]}" ||
	fail "consumer.cpp does not build against the installed <broker/client.hpp>"
"${cc[@]}" "${sanitize[@]}" -Wall -Wextra -Werror -o "$work/consumer-c" "$HERE/consumer.c" "${flags[@]}" ||
	fail "consumer.c does not build against the installed <broker/client.h>"
export LD_LIBRARY_PATH="$dest$LIBDIR"
# Whole output first: grep -q would stop reading early, and pipefail would see ldd's SIGPIPE.
loaded="$(ldd "$work/consumer-cpp")"
[[ "$loaded" == *"=> $dest$LIBDIR/libbroker-client.so.0 "* ]] ||
	fail "consumer-cpp does not load libbroker-client from the DESTDIR:"$'\n'"$loaded"

step "the workers run: ENXIO without sockets, and the socket under plain LISTEN_FDS"
clean_env=(env -u BROKER_SOCKET -u BROKER_TOKEN -u BROKER_SERVICE -u LISTEN_FDS -u LISTEN_PID -u LISTEN_FDNAMES
	-u NOTIFY_SOCKET)
for consumer in consumer-cpp consumer-c; do
	rc=0
	out="$("${clean_env[@]}" "$work/$consumer" 2>&1)" || rc=$?
	echo "$out"
	((rc == 3)) || fail "$consumer without BROKER_SOCKET or LISTEN_FDS exited $rc, expected 3 (ENXIO)"
	[[ "$out" == *ENXIO* ]] || fail "$consumer did not report ENXIO"
	if [[ "$consumer" == consumer-cpp && "$out" != *"no BROKER_SOCKET or LISTEN_FDS"* ]]; then
		fail "broker::Error does not say what is missing"
	fi
	out="$(python3 "$HERE/with_listen_fd.py" "$work/$consumer.sock" probe "$work/$consumer" 2>&1)" ||
		fail "$consumer with one socket at fd 3:"$'\n'"$out"
	echo "$out"
done

step "libbroker-client exports only broker:: and broker_client_ symbols"
lib="$dest$LIBDIR/libbroker-client.so.0"
stray="$(nm -D --defined-only "$lib" | awk '{ print $NF }' | c++filt |
	grep -Ev '^(broker::|broker_client_|(typeinfo|typeinfo name|vtable) for broker::)' || true)"
[[ -z "$stray" ]] || fail "libbroker-client exports symbols outside broker:: and broker_client_:"$'\n'"$stray"

# A missing tool left out its one check, not the others: they passed, and the run is a skip.
if ((${#skipped[@]} > 0)); then
	for what in "${skipped[@]}"; do
		echo "$me: SKIP: not checked: $what"
	done
	echo "$me: every other check passed"
	exit 77
fi
echo "$me: all checks passed"
