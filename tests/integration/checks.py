"""What the Python integration tests share: numbered checks, and the processes a run left below it."""

import os

# Every check() so far, by outcome; a script ends non-zero when failures is not empty.
failures = []
passes = []


def check(cond, what):
    print(("ok     " if cond else "FAILED ") + what, flush=True)
    (passes if cond else failures).append(what)
    return cond


def descendants(root):
    """Pids below root, from /proc, so that nothing outlives a failed run."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    stat = f.read()
                parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out
