"""Slurm node Prolog and Epilog: thin clients of ztgpu-noded.

Slurm drains a node when its Prolog or Epilog exits non-zero, so these exit
non-zero only when the *node* is unsafe: the agent cannot be reached, or it
could not apply (or undo) enforcement. A job whose Slurm environment is
malformed is refused without draining: it is granted nothing, the agent
records the refusal and ends the job.

Standard library plus :mod:`ztgpu.node_client` and :mod:`ztgpu.slurm.env`
only: this runs on every job start and end.
"""

from __future__ import annotations

import os
import sys

from ztgpu.errors import AgentUnreachable, Denied, Fault, InputRejected
from ztgpu.node_client import call, send_checked
from ztgpu.slurm.env import parse_job_env, parse_job_id

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

EXIT_OK = 0
EXIT_NODE_UNSAFE = 1


def _say(hook: str, message: str) -> None:
    print(f"ztgpu {hook}: {message}", file=sys.stderr, flush=True)


def run_hook(hook: str, socket_path: str, env: Mapping[str, str],
             timeout: float = 10.0) -> int:
    """Carry out *hook* (``prolog`` or ``epilog``) and return its exit code."""
    if hook not in ("prolog", "epilog"):
        _say(hook, "internal error: unknown hook name")
        return EXIT_NODE_UNSAFE
    fields: dict[str, Any] = {}
    try:
        if hook == "epilog":
            # Release goes by job id alone: the agent undoes what it granted that
            # job from its own record, whatever the environment or NSS says now
            # (a user deleted while the job ran, LDAP down).
            job_id = parse_job_id(env.get("SLURM_JOB_ID"))
        else:
            job = parse_job_env(env)
            job_id = job.job_id
            fields = {"uid": job.uid, "user": job.user, "gpus": job.gpus,
                      "partition": job.partition, "account": job.account}
    except InputRejected as exc:
        _say(hook, f"job refused, no GPU granted: {exc}")
        try:
            call(socket_path, "refused", timeout=timeout, hook=hook, reason=str(exc),
                 job_id=(env.get("SLURM_JOB_ID") or "")[:64])
        except AgentUnreachable as down:
            _say(hook, f"node unsafe: {down}; start it with 'systemctl start ztgpu-noded'")
            return EXIT_NODE_UNSAFE
        except (Denied, Fault) as other:
            _say(hook, f"the agent did not record the refusal: {other}")
        return EXIT_OK
    try:
        send_checked(socket_path, hook, timeout, job_id=job_id, **fields)
    except AgentUnreachable as exc:
        _say(hook, f"node unsafe: {exc}; start it with 'systemctl start ztgpu-noded'")
        return EXIT_NODE_UNSAFE
    except Denied as exc:
        # Includes InputRejected: a decision about this job, not a node fault.
        _say(hook, f"job {job_id} refused, no GPU granted: {exc}")
        return EXIT_OK
    except Fault as exc:
        _say(hook, f"node unsafe: enforcement for job {job_id} failed: {exc}")
        return EXIT_NODE_UNSAFE
    return EXIT_OK


def run_task_prolog(task_socket: str, timeout: float = 10.0) -> int:
    """TaskProlog: have the agent confine this task before the user's program runs.

    Runs as the job's user inside the task. Prints nothing on stdout (Slurm
    reads a TaskProlog's stdout for ``export``/``print`` commands). A
    non-zero exit makes Slurm fail the task rather than run it unconfined.
    """
    try:
        # A busy agent (another user flooding this socket) is retried within
        # the budget by the client.
        send_checked(task_socket, "confine", timeout)
    except (AgentUnreachable, Denied, Fault) as exc:
        _say("task prolog", f"this task cannot be confined to its GPUs: {exc}")
        return EXIT_NODE_UNSAFE
    return EXIT_OK


def main(hook: str, socket_path: str, timeout: float = 10.0) -> int:
    """Entry point used by the installed hook wrappers."""
    if hook == "task_prolog":
        return run_task_prolog(socket_path, timeout)
    return run_hook(hook, socket_path, os.environ, timeout)
