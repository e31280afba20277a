# Shared helpers for the quick-start scripts: sourced, never run. Sets ROOT and cds there.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

# What the build and the tests need, as Debian 12 package names. cmake is here because meson
# finds doctest through its CMake config; systemd brings systemd-socket-activate and
# systemd-socket-proxyd, which the integration tests drive.
DEPS=(
	g++ meson ninja-build pkg-config
	libsystemd-dev nlohmann-json3-dev libcli11-dev doctest-dev cmake
	python3 curl systemd procps
)
# What only the test suite adds, so that as root no test skips: Go and Debian's varlink-go, for
# the Varlink interop test (tests/interop), which builds a Go client offline against the packaged
# source; man and groff, for install-consumer's man page checks (systemd-analyze, and the systemd
# tools of the integration tests, come with systemd above); promtool (in prometheus), which checks
# the metrics text; openssh-server, for `brokerctl -H` against a local sshd; bash-completion, whose
# loader the completion test uses; dh-python, for the Python library's Debian package;
# ansible-core, which runs the fleet example (examples-ansible).
TEST_DEPS=(golang-go golang-github-varlink-go-dev man-db groff-base
	prometheus openssh-server bash-completion dh-python ansible-core)

die() {
	printf 'scripts/%s: error: %s\n' "$(basename "$0")" "$*" >&2
	exit 1
}

info() {
	printf 'scripts/%s: %s\n' "$(basename "$0")" "$*" >&2
}

# ensure_deps [PACKAGE...]: installs whatever of DEPS and the named packages is missing, with one
# apt-get update, and only then.
ensure_deps() {
	local missing=() pkg
	for pkg in "${DEPS[@]}" "$@"; do
		if [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null)" != ii* ]]; then
			missing+=("$pkg")
		fi
	done
	if ((${#missing[@]} == 0)); then
		return 0
	fi

	if ((EUID != 0)); then
		printf 'scripts/%s: error: missing Debian packages: %s\n' "$(basename "$0")" "${missing[*]}" >&2
		printf 'Install them as root:\n  apt-get install %s\n' "${missing[*]}" >&2
		exit 1
	fi
	info "installing missing packages: ${missing[*]}"
	apt-get update || die "apt-get update failed"
	# Some of them are servers (prometheus, sshd) whose packages start them: a policy-rc.d that
	# answers 101 keeps invoke-rc.d and deb-systemd-invoke from starting anything while we install.
	local policy=/usr/sbin/policy-rc.d ours=0 rc=0
	if [[ ! -e "$policy" ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && ours=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" || rc=$?
	if ((ours)); then
		rm -f "$policy"
	fi
	((rc == 0)) || die "apt-get install failed for: ${missing[*]}"
}

# build DIR [meson options...]: configures DIR with the options (set up once, or updated with
# `meson configure` so an old dir gets options added since), then compiles. meson regenerates
# the build files itself when meson.build changes.
build() {
	local dir="$1"
	shift
	if [[ -f "$dir/build.ninja" ]]; then
		if (($# > 0)); then
			meson configure "$dir" "$@" || die "meson configure failed in $dir"
		fi
	elif [[ -f "$dir/meson-private/coredata.dat" ]]; then
		# A configured dir whose last setup failed half-way.
		meson setup --reconfigure "$dir" "$ROOT" "$@" || die "meson setup failed in $dir"
	else
		meson setup "$dir" "$ROOT" "$@" || die "meson setup failed in $dir"
	fi
	meson compile -C "$dir" || die "build failed in $dir"
}
