#!/usr/bin/env python3
"""brokerctl fits an operator's habits, against a real brokerd: a value brokerd refuses is a usage
error (exit 2) naming the option that sent it, and the bash completion file completes commands,
options and brokerd's services, with the same commands and options as brokerctl's own --help (so
that a new command or option without its completion entry fails here).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from checks import check, run_with_brokerd

BROKERCTL = os.environ["BROKERCTL"]
COMPLETION = os.path.join(os.environ["SOURCE_ROOT"], "packaging", "brokerctl.bash-completion")
# bash-completion's loader, which finds a completion by the command's name (the installed file's).
LOADER = "/usr/share/bash-completion/bash_completion"


def brokerctl(*args, env=None):
    return subprocess.run([BROKERCTL, *args], capture_output=True, text=True, timeout=60, env=env)


def complete(*words, env=None):
    """COMPREPLY of _brokerctl for the command line `words`, the last being the word under the cursor."""
    script = 'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _brokerctl; printf "%s\\n" "${COMPREPLY[@]}"'
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script, "bash", COMPLETION, *words],
                         capture_output=True, text=True, timeout=60, env=env)
    check(out.returncode == 0 and out.stderr == "",
          "completing %r: bash exits 0 and says nothing on stderr (got %d, %r)" % (words, out.returncode, out.stderr))
    return sorted(w for w in out.stdout.split("\n") if w)


def table():
    """{command: (arguments, options)} from the completion file's table."""
    script = ('source "$1"; for e in "${_brokerctl_commands[@]}"; do read -r n _ <<<"$e"; _brokerctl_entry "$n"; '
              'echo "$n|${_brokerctl_args[*]}|${_brokerctl_opts[*]}"; done; echo "|global|${_brokerctl_global[*]}"')
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script, "bash", COMPLETION],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rows = {}
    for line in out.splitlines():
        name, args, opts = line.split("|")
        rows[name or "global"] = (args.split(), sorted(opts.split()))
    return rows


def help_options(text, section="Options:"):
    """The options a CLI11 help section lists, each as completion spells it ("--batch=" takes a value)."""
    opts, inside = [], False
    for line in text.splitlines():
        if line.strip() == section:
            inside = True
            continue
        if inside and not line.strip():
            break
        m = re.match(r"  (-\S+)(?: (\S+))?", line) if inside else None
        if not m:
            continue
        value = m.group(2) is not None and m.group(2) not in ("Excludes:", "Needs:", "REQUIRED")
        for name in m.group(1).split(","):
            if name != "-h":
                opts.append(name + ("=" if value else ""))
    return sorted(opts)


def help_commands(text):
    """The commands `brokerctl --help` lists."""
    names, inside = [], False
    for line in text.splitlines():
        if line.strip() == "Commands:":
            inside = True
        elif inside and not line.strip():
            break
        elif inside:
            names.append(line.split()[0])
    return names


def refused_parameters(control):
    # Values brokerctl passes on and brokerd refuses: the option, not "see brokerctl status".
    cases = [
        (["--batch", "5000"], "--batch", "from 1 to 1024"),
        (["--env", "BROKER_X=1"], "--env", "set by brokerd"),
        (["--exec", ""], "--exec", "non-empty"),
    ]
    for args, option, why in cases:
        r = brokerctl("--socket", control, "upgrade", "web", *args)
        what = "upgrade web %s" % " ".join(args)
        check(r.returncode == 2, "%s: exit 2, a usage error (got %d: %r)" % (what, r.returncode, r.stderr))
        check(r.stderr.startswith("brokerctl: brokerd refused %s of upgrade: " % option) and why in r.stderr,
              "%s: the message names %s and says why (%r)" % (what, option, r.stderr))
        check("brokerctl status" not in r.stderr, "%s: no pointer to brokerctl status (%r)" % (what, r.stderr))
        check(r.stdout == "", "%s: nothing on stdout (%r)" % (what, r.stdout))
    status = brokerctl("--socket", control, "--json", "status", "web")
    check(status.returncode == 0 and '"number": 1' in status.stdout and '"number": 2' not in status.stdout,
          "the refusals began nothing: web is still at gen 1 (%r)" % status.stdout[:200])


def services_command(control, tmp):
    r = brokerctl("--socket", control, "_services")
    check((r.returncode, r.stdout, r.stderr) == (0, "web\n", ""),
          "_services prints the one service, web (got %d, %r, %r)" % (r.returncode, r.stdout, r.stderr))
    r = brokerctl("--socket", os.path.join(tmp, "nothing.sock"), "_services")
    check((r.returncode, r.stdout, r.stderr) == (0, "", ""),
          "_services without brokerd: nothing at all, exit 0 (got %d, %r, %r)" % (r.returncode, r.stdout, r.stderr))
    r = brokerctl("--help")
    check("_services" not in r.stdout, "_services is not in brokerctl --help")


def completion(control, tmp):
    path_env = dict(os.environ, PATH=os.path.dirname(BROKERCTL) + os.pathsep + os.environ["PATH"])
    bin_dir = os.path.join(tmp, "bin")
    os.mkdir(bin_dir)
    probe = os.path.join(bin_dir, "cli-habits-probe")
    with open(probe, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(probe, 0o755)
    probe_env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"])
    cases = [
        (["brokerctl", "up"], ["upgrade"], path_env),
        (["brokerctl", "st"], ["start", "status", "stop"], path_env),
        ([BROKERCTL, "--socket", control, "upgrade", ""], ["web"], None),
        ([BROKERCTL, "--socket", "=", control, "status", "w"], ["web"], None),  # --socket=PATH, as bash splits it
        ([BROKERCTL, "rollback", "--socket", control, "--no-wait", ""], ["web"], None),
        (["brokerctl", "--socket", control, "abort", "w"], ["web"], path_env),  # brokerctl from PATH
        ([BROKERCTL, "--socket", control, "upgrade", "web", ""], [], None),  # one SERVICE only
        ([BROKERCTL, "--socket", control, "upgrade", "web", "--batch", ""], [], None),  # a value, not a service
        ([BROKERCTL, "--socket", control, "sockets", ""], [], None),
        ([BROKERCTL, "--socket", os.path.join(tmp, "nothing.sock"), "upgrade", ""], [], None),
        ([BROKERCTL, "-H", "web1", "st"], ["start", "status", "stop"], None),  # -H takes a value
        ([BROKERCTL, "-H", "web1", ":", "22", "st"], ["start", "status", "stop"], None),  # HOST:PORT, split
        ([BROKERCTL, "--host", "=", "web1", "--socket", control, "upgrade", ""], [], None),  # another host's services
        ([BROKERCTL, "--host=web1", "--socket=" + control, "status", ""], [], None),  # "=" not a word break
        ([BROKERCTL, "--socket=" + control, "status", ""], ["web"], None),
        ([BROKERCTL, "upgrade", "web", "--ba"], ["--batch"], None),
        ([BROKERCTL, "upgrade", "--d"], ["--drain-timeout"], None),
        ([BROKERCTL, "status", "--j"], ["--json"], None),
        ([BROKERCTL, "--ver"], ["--version"], None),
        ([BROKERCTL, "upgrade", "--ver"], ["--version"], None),
        ([BROKERCTL, "reexec", "--"], ["--binary", "--help", "--host", "--json", "--socket", "--timeout"], None),
        ([BROKERCTL, "-"], ["--help", "--host", "--json", "--socket", "--timeout", "--version", "-H"], None),
        ([BROKERCTL, "bogus", ""], [], None),
        ([BROKERCTL, "upgrade", "web", "--exec", "--", "cli-habits-pro"], ["cli-habits-probe"], probe_env),
        ([BROKERCTL, "upgrade", "web", "--exec", "--", "prog", os.path.join(tmp, "compl")],
         [os.path.join(tmp, "completion-probe")], None),  # its arguments: files
        ([BROKERCTL, "--socket", os.path.join(tmp, "compl")], [os.path.join(tmp, "completion-probe")], None),
    ]
    open(os.path.join(tmp, "completion-probe"), "w").close()
    for words, want, env in cases:
        got = complete(*words, env=env)
        check(got == want, "completing %s: %s (got %s)" % (" ".join(words[1:]) or "''", want, got))

    # The table against brokerctl's own help: every command, its arguments and options.
    main_help = brokerctl("--help").stdout
    commands = help_commands(main_help)
    rows = table()
    check(len(commands) >= 11, "brokerctl --help lists the commands (%s)" % commands)
    check(complete(BROKERCTL, "") == sorted(commands),
          "completing the command word offers exactly the commands brokerctl --help lists")
    check(sorted(rows["global"][1] + ["--version"]) == help_options(main_help),
          "the global options are brokerctl --help's (%s, help %s)" % (rows["global"][1], help_options(main_help)))
    for name in commands:
        if not check(name in rows, "%s has a completion entry" % name):
            continue
        sub = brokerctl(name, "--help").stdout
        usage = re.search(r"^Usage: \S+ %s \[OPTIONS\](.*)$" % re.escape(name), sub, re.M)
        args = usage.group(1).split() if usage else None
        check(rows[name][0] == args, "%s: the arguments are its Usage line's (%s, help %s)" % (name, rows[name][0], args))
        want = [o for o in help_options(sub) if o != "--help"]
        check(rows[name][1] == want, "%s: the options are its --help's (%s, help %s)" % (name, rows[name][1], want))

    # Installed as bash-completion/completions/brokerctl, bash-completion's loader finds it by name.
    if os.path.exists(LOADER):
        user = os.path.join(tmp, "user")
        os.makedirs(os.path.join(user, "completions"))
        shutil.copy(COMPLETION, os.path.join(user, "completions", "brokerctl"))
        script = 'source "$1"; __load_completion brokerctl; complete -p brokerctl'
        out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script, "bash", LOADER], capture_output=True,
                             text=True, timeout=60, env=dict(os.environ, BASH_COMPLETION_USER_DIR=user))
        check(out.stdout.strip() == "complete -F _brokerctl brokerctl",
              "bash-completion's loader finds the file under the name brokerctl (%r %r)" % (out.stdout, out.stderr))
    else:
        print("note   bash-completion is not installed: the loader check is left out", flush=True)


def decimal_numbers(control):
    # A number on the command line is decimal: "010" is ten, never octal eight; a sign, hex or
    # anything else is a usage error before brokerd is asked.
    r = brokerctl("--socket", control, "rollback", "web", "--to", "010")
    check(r.returncode == 2 and "no generation 10 still known" in r.stderr,
          "rollback --to 010 names generation 10 (exit %d: %r)" % (r.returncode, r.stderr))
    for args in (["rollback", "web", "--to", "-1"], ["rollback", "web", "--to", "0x10"],
                 ["scale", "web", "-1"], ["scale", "web", "0x2"], ["scale", "web", "2 "],
                 ["upgrade", "web", "--batch", "0x2"], ["upgrade", "web", "--batch", "+2"]):
        r = brokerctl("--socket", control, *args)
        what = " ".join(args)
        check(r.returncode == 2 and "decimal" in r.stderr,
              "%s: exit 2, a decimal number expected (exit %d: %r)" % (what, r.returncode, r.stderr))
    status = brokerctl("--socket", control, "--json", "status", "web")
    check(status.returncode == 0 and '"number": 2' not in status.stdout,
          "none of them began anything: web is still at gen 1 (%r)" % status.stdout[:200])


def body(control):
    tmp = tempfile.mkdtemp(prefix="cli-habits-")
    try:
        refused_parameters(control)
        decimal_numbers(control)
        services_command(control, tmp)
        completion(control, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_with_brokerd("cli-habits-", body))
