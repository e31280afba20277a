#!/usr/bin/env python3
"""examples/ansible/brokerd-upgrade.yml, run by ansible-playbook on localhost (connection local)
against a real brokerd: an upgrade that works passes and leaves the new version serving; one
whose new instance fails (exit 6) and one of an unknown service (exit 5) fail the play, each
naming brokerctl's exit code. Skips (77) without ansible-playbook (Debian package ansible-core).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from checks import check, run_with_brokerd

BROKERCTL = os.environ["BROKERCTL"]
PLAY = os.path.join(os.environ["SOURCE_ROOT"], "examples", "ansible", "brokerd-upgrade.yml")


def play(control, tmp, *extra):
    env = dict(os.environ, BROKERCTL_SOCKET=control, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=tmp,
               ANSIBLE_REMOTE_TEMP=tmp, ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3", HOME=tmp,
               PATH=os.path.dirname(BROKERCTL) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", PLAY, "-e", "target=localhost",
                           *extra], capture_output=True, text=True, timeout=300, env=env)


def web(control):
    out = subprocess.run([BROKERCTL, "--socket", control, "--json", "status", "web"], capture_output=True, text=True,
                         timeout=60).stdout
    return [(g["number"], g["version"]) for g in json.loads(out)["services"][0]["generations"]]


def body(control):
    tmp = tempfile.mkdtemp(prefix="ansible-rollout-")
    config = os.path.join(os.path.dirname(control), "brokerd.json")
    try:
        r = play(control, tmp, "-e", "service=web", "-e", "version=2.0")
        check(r.returncode == 0, "the play upgrades web: exit 0 (%d)\n%s" % (r.returncode, r.stdout[-1500:]))
        check(web(control) == [(2, "2.0")], "web serves gen 2, version 2.0, alone (%r)" % web(control))
        check(re.search(r"changed=1 .*failed=0", r.stdout) is not None, "the recap counts one change, no failure")
        check(re.search(r"TASK \[Check the service is active[^\n]*\n\s*ok: \[localhost\]", r.stdout) is not None,
              "the play's last check, brokerctl is-active, passes:\n" + r.stdout[-1500:])

        # A new version that exits at once: brokerctl exits 6, and the play stops.
        with open(config) as f:
            saved = f.read()
        broken = json.loads(saved)
        broken["services"]["web"]["exec"] = ["/bin/false"]
        with open(config, "w") as f:
            json.dump(broken, f)
        r = play(control, tmp, "-e", "service=web", "-e", "version=3.0")
        with open(config, "w") as f:
            f.write(saved)
        check(r.returncode != 0 and '"rc": 6' in r.stdout,
              "a failing version fails the play with brokerctl's exit 6 (%d)\n%s" % (r.returncode, r.stdout[-1500:]))
        check(web(control) == [(2, "2.0")], "web still serves gen 2 after the rollback (%r)" % web(control))

        r = play(control, tmp, "-e", "service=nope")
        check(r.returncode != 0 and '"rc": 5' in r.stdout,
              "an unknown service fails the play with exit 5 (%d)\n%s" % (r.returncode, r.stdout[-1500:]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if not shutil.which("ansible-playbook"):
        print("SKIPPED: no ansible-playbook here (Debian package ansible-core)")
        sys.exit(77)
    sys.exit(run_with_brokerd("ansible-rollout-", body))
