"""Isolation probe, run by the agent as a child process it keeps.

Standard library only and self-contained: the agent starts it once with
``python -I -S probe_child.py --serve`` and sends one JSON request per line
on stdin, each answered by one JSON line on stdout (without ``--serve`` it
answers a single request read from the whole of stdin)::

    {"paths": ["/dev/nvidia0", ...],
     "targets": [{"cgroup_procs": [".../devices/.../cgroup.procs"],
                  "uid": 1001, "gid": 1001, "groups": [1001, 44]}, ...]}

For each target it forks (this process is single-threaded, so forking is
safe and costs far less than starting another interpreter). The child, as
root, joins the target's cgroups, so the kernel applies exactly the job's
device rules, and opens every path read-write: root passes file permissions,
so this shows what the cgroup alone allows. It then drops to the job's
uid/gid with the user's supplementary groups (as the job has them: a
group-readable rest mode, e.g. for DCGM, is seen as the job would see it)
and opens every path again: the job's effective access. It prints one JSON
list, one entry per target, in order:
``{"cgroup_only": {path: outcome}, "user": {path: outcome}}`` or
``{"error": "..."}``, where an outcome is ``open`` (the open succeeded, or
reached the driver: ENXIO on a node with no driver behind it) or the errno
name that refused it (EPERM from a cgroup, EACCES from file permissions).
"""

from __future__ import annotations

import errno
import json
import os
import sys


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


def probe_one(target: dict[str, object], paths: list[str]) -> dict[str, object]:
    """Runs in a forked child: join, probe as root, drop, probe as the user."""
    procs = target["cgroup_procs"]
    assert isinstance(procs, list)
    for file in procs:
        fd = os.open(str(file), os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    cgroup_only = try_open(paths)
    if int(str(target["uid"])) == 0:
        # Root's own job (an admin's check): file permissions never stop root,
        # so what the cgroup allows is what the job gets.
        return {"cgroup_only": cgroup_only, "user": cgroup_only}
    groups = target.get("groups", [])
    assert isinstance(groups, list)
    os.setgroups([int(str(g)) for g in groups])
    os.setgid(int(str(target["gid"])))
    os.setuid(int(str(target["uid"])))
    if os.getuid() == 0 or os.geteuid() == 0:
        return {"error": "could not drop root"}
    return {"cgroup_only": cgroup_only, "user": try_open(paths)}


def run_target(target: dict[str, object], paths: list[str]) -> dict[str, object]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            result = probe_one(target, paths)
        except Exception as exc:  # noqa: BLE001 - reported to the agent, never lost
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    try:
        parsed = json.loads(data)
    except ValueError:
        return {"error": "probe child died without an answer"}
    return parsed if isinstance(parsed, dict) else {"error": "malformed probe answer"}


def answer(text: str) -> str:
    """One request's answer line; a request that cannot be read is answered as such."""
    try:
        request = json.loads(text)
        paths = [str(p) for p in request["paths"]]
        targets = request["targets"]
        assert isinstance(targets, list)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        return json.dumps({"error": f"bad request: {type(exc).__name__}"})
    return json.dumps([run_target(t, paths) for t in targets])


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        # Until the agent closes our stdin; a crash of ours is seen as EOF there.
        for line in sys.stdin:
            sys.stdout.write(answer(line) + "\n")
            sys.stdout.flush()
        return 0
    print(answer(sys.stdin.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
