"""Isolation probe, run by the agent as a short-lived child process.

Standard library only and self-contained: the agent runs it with
``python -I -S`` and a JSON request on stdin::

    {"cgroup_procs": ["/sys/fs/cgroup/devices/.../cgroup.procs"],
     "uid": 1001, "gid": 1001, "paths": ["/dev/nvidia0", ...]}

As root it first joins the given cgroups (so the kernel applies exactly the
job's device rules) and opens every path read-write: root passes file
permissions, so this pass shows what the cgroup alone allows. Then it drops
to the job's uid/gid with no supplementary groups and opens every path
again: the job's effective access. It prints
``{"cgroup_only": {path: outcome}, "user": {path: outcome}}`` where an
outcome is ``open`` (the open succeeded, or reached the driver: ENXIO on a
device node with no driver behind it) or the errno name that refused it
(EPERM from a cgroup, EACCES from file permissions, ...).
"""

from __future__ import annotations

import errno
import json
import os
import sys


def main() -> int:
    request = json.loads(sys.stdin.read())
    for procs in request["cgroup_procs"]:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    cgroup_only = try_open(request["paths"])
    os.setgroups([])
    os.setgid(int(request["gid"]))
    os.setuid(int(request["uid"]))
    if os.getuid() == 0 or os.geteuid() == 0:
        print(json.dumps({"error": "could not drop root"}))
        return 1
    print(json.dumps({"cgroup_only": cgroup_only, "user": try_open(request["paths"])}))
    return 0


def try_open(paths: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            code = exc.errno or 0
            result[path] = "open" if code == errno.ENXIO else errno.errorcode.get(code, str(code))
        else:
            os.close(fd)
            result[path] = "open"
    return result


if __name__ == "__main__":
    sys.exit(main())
