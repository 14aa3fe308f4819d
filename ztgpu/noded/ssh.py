"""SSH logins on a compute node: who may log in, and into which job.

The PAM module (:mod:`ztgpu.pam`) is a thin client of these operations; it
runs as root inside sshd, so the agent knows the session's process from the
kernel (SO_PEERCRED), never from the request.

* **Account** (``ssh_account``): a user may log in while the agent holds a
  running job of theirs on this node (any job its Prolog granted, with or
  without GPUs), or while authd shows a just-in-time admin grant for them
  on this node. Anyone else is refused with a message for the ssh client.
* **Session** (``ssh_open``): the session's process (sshd's ``[priv]``
  process for pam_python, the parent of the ``pam_exec`` program) goes into
  the chosen job's extern step: every v1 hierarchy Slurm built for it
  (freezer first, so the process counts as the job's) or, on cgroup v2, the
  step's ``user/task_special`` leaf, as pam_slurm_adopt does. The agent's
  device narrowing is then applied exactly as for the job's own tasks (its
  denies on Slurm's devices cgroup, its own per-job cgroup when
  ConstrainDevices is off, its program on the v2 step), so the shell opens
  exactly that job's GPUs. Slurm ends the extern step's processes when the
  job ends, and the release ends anything still holding a GPU.
* **Which job** when the user has several here: the one named in the
  user's ``~/.config/ztgpu/ssh-job`` (a job id; read without following
  links, only if the user owns it) when it is one of theirs here, else the
  newest grant. pam_slurm_adopt asks Slurm which job the connection comes
  from (its callerid RPC); the agent does not, so an ssh from inside
  another job lands in the newest job unless the file says otherwise.
* **Just-in-time admin access**: a user with an active JIT grant for this
  node and no job here is let in; the session goes into an agent-made
  cgroup that denies every GPU (v1), is recorded, and is ended when the
  grant expires or is revoked.
* **TOTP for JIT access** (``ssh_auth``, ``ssh_mfa``; the stack's
  ``mfa=jit``): in the auth phase the module asks whether this login would
  be a JIT one (no job here, an active grant); if so it asks the user for a
  TOTP code, has authd check it, and tells the agent (``ssh_mfa``). The
  agent keeps that for :data:`MFA_VALID_S` seconds, bound to the process
  that asked and its parent (sshd runs the auth phase in a child of the
  process that then runs the account phase); an account request marked
  ``jit_mfa`` lets a JIT login in only with such a record, so a stack or an
  sshd that skips the auth phase fails closed.
* **Moved out**: an adopted session that later sits outside its job (e.g.
  pam_systemd ran after the module and moved it into a logind scope) is
  recorded critically and put back into the job.

Every decision is an ``ssh.*`` audit event: user, source address, service,
job, outcome, reason and the action the module takes on a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztgpu.errors import CgroupError, Fault, InputRejected, ZtgpuError
from ztgpu.noded import holders, job_cgroups
from ztgpu.noded.confinement import Confinement
from ztgpu.noded.core import LiveJob
from ztgpu.slurm.env import parse_job_id, valid_user_name

#: The PAM module's failure modes and the actions it may take for each.
ACTION_NAMES = ("no_agent", "no_job", "adopt_failure", "error")
ACTIONS = ("deny", "allow")
#: How long a TOTP check of the auth phase stands for the account phase.
MFA_VALID_S = 120.0
#: Where a user may name the job an SSH login should join (relative to home).
JOB_CHOICE_FILE = Path(".config/ztgpu/ssh-job")
#: What asking authd for JIT grants may raise (refused, unreachable, garbage).
_LOOKUP_ERRORS = (ZtgpuError, OSError, KeyError, TypeError, ValueError)
_SERVICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass
class Adopted:
    """A session process the agent put into a job (or a JIT admin cgroup)."""

    pid: int
    start: int
    user: str
    rhost: str
    service: str
    job_id: str | None
    #: JIT only: when the grant ends (monotonic), and its id.
    until: float | None = None
    jit_id: str | None = None


def _text(req: dict[str, Any], key: str, limit: int, *, required: bool = True) -> str:
    value = req.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise InputRejected(f"'{key}' must be a printable string of at most {limit} characters")
    return value


def _parse(req: dict[str, Any]) -> tuple[str, str, str, dict[str, str]]:
    user = req.get("user")
    if not isinstance(user, str) or not valid_user_name(user):
        raise InputRejected("'user' must be a user name")
    rhost = _text(req, "rhost", 255, required=False)
    service = _text(req, "service", 64)
    if not _SERVICE_CHARS.issuperset(service):
        raise InputRejected("'service' must be a PAM service name")
    raw = req.get("actions", {})
    if not isinstance(raw, dict) or not all(
            k in ACTION_NAMES and v in ACTIONS for k, v in raw.items()):
        raise InputRejected(f"'actions' maps {'/'.join(ACTION_NAMES)} to deny or allow")
    return user, rhost, service, {k: str(v) for k, v in raw.items()}


class SshAccess(Confinement):
    """Account and session decisions for SSH logins (see the module docs)."""

    #: Set by the service when authd is configured: active JIT grants of a
    #: user on this node, as ``[{"id", "expires"}]`` (raises on failure).
    jit_lookup: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Session processes put into a job or a JIT cgroup, by pid.
        self.adopted: dict[int, Adopted] = {}
        #: TOTP checks of JIT logins' auth phase: (user, pid) -> until (monotonic).
        self.mfa_passed: dict[tuple[str, int], float] = {}

    def _user_jobs(self, uid: int) -> list[LiveJob]:
        with self.lock:
            return [live for live in self.jobs.values()
                    if live.record.uid == uid and live.record.job_id not in self.releasing
                    and live.record.job_id not in self.revoked_jobs]

    def _jit(self, user: str) -> list[dict[str, Any]]:
        if self.jit_lookup is None:
            return []
        found = self.jit_lookup(user)
        return [g for g in found if isinstance(g, dict)] if isinstance(found, list) else []

    def _record(self, code: str, user: str, rhost: str, service: str, **fields: Any) -> None:
        self.spool.append(code, user=user, rhost=rhost, service=service, **fields)

    # ---- auth (TOTP for JIT logins) -------------------------------------
    def ssh_auth(self, req: dict[str, Any]) -> dict[str, Any]:
        """Would this login be a JIT one, so that the module asks for TOTP?"""
        user, _, _, _ = _parse(req)
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            return {"mfa": False, "reason": "no such user (the account phase refuses)"}
        if uid == 0 or self._user_jobs(uid):
            return {"mfa": False, "reason": "root, or a running job here"}
        try:
            jit = self._jit(user)
        except _LOOKUP_ERRORS:
            return {"mfa": False, "reason": "JIT grants cannot be checked (the account "
                                             "phase refuses)"}
        return {"mfa": bool(jit), "reason": "just-in-time admin access" if jit else
                "no job and no JIT grant (the account phase refuses)"}

    def ssh_mfa(self, req: dict[str, Any], peer_pid: int) -> dict[str, Any]:
        """The module checked this login's TOTP code with authd: remember it
        for the account phase (of this process or its parent)."""
        user, rhost, service, _ = _parse(req)
        passed = req.get("passed") is True
        self._record("ssh.mfa", user, rhost, service, outcome="passed" if passed else "failed",
                     reason=_text(req, "reason", 300, required=False) or
                     ("TOTP code accepted by authd" if passed else "TOTP check failed"))
        if passed:
            until = time.monotonic() + MFA_VALID_S
            info = job_cgroups.proc_info(peer_pid)
            with self.lock:
                now = time.monotonic()
                for key in [k for k, v in self.mfa_passed.items() if v < now]:
                    del self.mfa_passed[key]
                self.mfa_passed[(user, peer_pid)] = until
                if info is not None and info[0] > 1:
                    self.mfa_passed[(user, info[0])] = until
        return {"recorded": True}

    def _mfa_ok(self, user: str, peer_pid: int) -> bool:
        with self.lock:
            until = self.mfa_passed.pop((user, peer_pid), None)
        return until is not None and until >= time.monotonic()

    # ---- account --------------------------------------------------------
    def ssh_account(self, req: dict[str, Any], peer_pid: int = 0) -> dict[str, Any]:
        """May *user* log in here? Always answers; records the decision."""
        user, rhost, service, actions = _parse(req)
        if req.get("break_glass") is True:
            # The module let a break-glass account in without asking; record it.
            self._record("ssh.login", user, rhost, service, outcome="allowed",
                         reason="break-glass account (allowed by the PAM module itself)",
                         action="none")
            return {"allow": True, "code": "break_glass", "message": ""}
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            return self._deny(user, rhost, service, actions, "error",
                              f"user {user} does not exist on this node")
        if uid == 0:
            self._record("ssh.login", user, rhost, service, outcome="allowed",
                         reason="root", action="none")
            return {"allow": True, "code": "root", "message": ""}
        jobs = self._user_jobs(uid)
        if jobs:
            ids = [live.record.job_id for live in jobs]
            self._record("ssh.login", user, rhost, service, job_id=ids[-1], jobs=ids,
                         outcome="allowed", reason="running job on this node", action="none")
            return {"allow": True, "code": "job", "jobs": ids, "message": ""}
        try:
            jit = self._jit(user)
        except _LOOKUP_ERRORS as exc:  # authd down or refusing: no JIT access, said so
            jit = []
            jit_problem = f"; JIT grants could not be checked: {str(exc)[:200]}"
        else:
            jit_problem = ""
        if jit and req.get("jit_mfa") is True and not self._mfa_ok(user, peer_pid):
            return self._deny(user, rhost, service, actions, "mfa_required",
                              "just-in-time access needs a TOTP code in this login's auth "
                              "phase, and it has none (sshd needs `AuthenticationMethods "
                              "publickey,keyboard-interactive` and the stack the ztgpu auth "
                              "line with mfa=jit)")
        if jit:
            self._record("ssh.login", user, rhost, service, outcome="allowed",
                         reason=f"just-in-time admin access {jit[0].get('id')} until "
                                f"{jit[0].get('expires')}", action="none")
            return {"allow": True, "code": "jit", "message":
                    f"ztgpu: just-in-time admin access until {jit[0].get('expires')}; "
                    f"this session is recorded"}
        return self._deny(user, rhost, service, actions, "no_job",
                          f"no running job of {user} on {self.config.node_name}{jit_problem}")

    def _deny(self, user: str, rhost: str, service: str, actions: dict[str, str],
              code: str, reason: str) -> dict[str, Any]:
        action = actions.get(code, "deny")
        self._record("ssh.denied", user, rhost, service, outcome="denied",
                     reason=reason[:500], action=action)
        message = (f"ztgpu: access denied: you have no running job on "
                   f"{self.config.node_name}. Log in here only while a job of yours "
                   f"runs on it (sbatch/salloc), or use `srun --jobid=JOB --overlap --pty "
                   f"bash`." if code == "no_job" else f"ztgpu: access denied: {reason}")
        return {"allow": False, "code": code, "message": message}

    # ---- session --------------------------------------------------------
    def _session_pid(self, peer_pid: int, target: Any) -> int:
        if target == "self":
            return peer_pid
        if target == "parent":
            info = job_cgroups.proc_info(peer_pid)
            if info is None:
                raise Fault("the PAM client exited before its session could be adopted")
            return info[0]
        raise InputRejected("'target' must be 'self' or 'parent'")

    def _choose(self, user: str, uid: int, jobs: list[LiveJob]) -> tuple[LiveJob, str]:
        """The job a session of *user* joins, and why."""
        newest = max(jobs, key=lambda live: (live.record.granted_at, int(live.record.job_id)))
        named = self._named_job(user, uid)
        if named is None:
            return newest, "newest job" if len(jobs) > 1 else "the user's job here"
        for live in jobs:
            if live.record.job_id == named:
                return live, f"job named in ~/{JOB_CHOICE_FILE}"
        return newest, f"~/{JOB_CHOICE_FILE} names job {named}, not running here: newest job"

    def _named_job(self, user: str, uid: int) -> str | None:
        try:
            home = Path(pwd.getpwnam(user).pw_dir)
            fd = os.open(home / JOB_CHOICE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (KeyError, OSError):
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                return None
            text = os.read(fd, 64).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        with contextlib.suppress(InputRejected):
            return parse_job_id(text)
        return None

    def ssh_open(self, req: dict[str, Any], peer_pid: int) -> dict[str, Any]:
        """Put the session's process into the user's job; Fault if it cannot be."""
        user, rhost, service, actions = _parse(req)
        pid = self._session_pid(peer_pid, req.get("target"))
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            raise InputRejected(f"user {user} does not exist on this node") from None
        if uid == 0 or req.get("break_glass") is True:
            why = "root" if uid == 0 else "break-glass account"
            self._record("ssh.session", user, rhost, service, pid=pid,
                         outcome="not_adopted", reason=f"{why}: not put into a job")
            return {"adopted": False, "job_id": None, "message": ""}
        jobs = self._user_jobs(uid)
        if not jobs:
            return self._open_jit(user, rhost, service, pid, actions)
        live, why = self._choose(user, uid, jobs)
        job_id = live.record.job_id
        try:
            where = self._adopt(live, pid)
        except (CgroupError, Fault) as exc:
            self._record("ssh.session", user, rhost, service, job_id=job_id, pid=pid,
                         outcome="adopt_failed", reason=str(exc)[:500],
                         action=actions.get("adopt_failure", "deny"))
            raise Fault(f"could not put the session into job {job_id}: {exc}") from None
        start = holders.start_time(pid)
        with self.lock:
            if start is not None:
                self.adopted[pid] = Adopted(pid=pid, start=start, user=user, rhost=rhost,
                                               service=service, job_id=job_id)
        self._record("ssh.session", user, rhost, service, job_id=job_id, pid=pid,
                     outcome="adopted", reason=f"{why}; {where}"[:500])
        message = f"ztgpu: this session runs in job {job_id}"
        if len(jobs) > 1:
            message += (f" ({why}; you have {len(jobs)} jobs here: write a job id into "
                        f"~/{JOB_CHOICE_FILE} to choose)")
        return {"adopted": True, "job_id": job_id, "message": message}

    def _adopt(self, live: LiveJob, pid: int) -> str:
        """Move *pid* into the job's extern step; returns where it went."""
        record = live.record
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            raise Fault(f"the session process {pid} is gone") from None
        try:
            if self.steps is not None:
                return self._adopt_v2(live, pid, pidfd)
            if not self.v1:
                raise Fault("this node has no cgroup device layer to adopt into")
            root = self.config.cgroups.root
            pattern = f"slurm*/uid_{record.uid}/job_{record.job_id}/step_extern"
            freezer = sorted((root / "freezer").glob(pattern))
            for _ in range(3):  # seen missing for a moment under load: look again
                if freezer:
                    break
                time.sleep(0.05)
                freezer = sorted((root / "freezer").glob(pattern))
            if not freezer:
                raise Fault(f"job {record.job_id} has no extern step on this node "
                            f"(slurm.conf needs PrologFlags=Contain; `ztgpu install` sets it)")
            others = sorted(p for p in root.glob(f"*/{pattern}")
                            if p.parts[len(root.parts)] != "freezer")
            moved = []
            for cgroup in [freezer[0], *others]:
                if holders.exited(pidfd) or not self.devices.attach(cgroup, pid):
                    raise Fault(f"the session process {pid} is gone")
                moved.append(str(cgroup.relative_to(root)))
            # Then the same device narrowing as the job's own tasks get.
            placed = self._place(live, pid)
            if placed is None:
                raise Fault(f"job {record.job_id} ended while its session was adopted")
            return f"cgroups {', '.join(moved)}; devices {self.cgroup_name(placed)}"
        finally:
            os.close(pidfd)

    def _adopt_v2(self, live: LiveJob, pid: int, pidfd: int) -> str:
        record = live.record
        dirs = job_cgroups.v2_job_dirs(self.layer.root, record.job_id)
        step = next((d / "step_extern" for d in dirs if (d / "step_extern").is_dir()), None)
        if step is None:
            raise Fault(f"job {record.job_id} has no extern step on this node "
                        f"(slurm.conf needs PrologFlags=Contain; `ztgpu install` sets it)")
        if not self._cover_step(live, step):
            raise Fault(f"job {record.job_id}'s extern step cannot be confined")
        # Slurm 22.05 may not have made the step's user/ level yet for an
        # extern step with no task; make both (a leaf can take processes).
        leaf = step / "user" / "task_special"
        try:
            leaf.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot make {leaf}: {exc.strerror}") from exc
        if holders.exited(pidfd) or not self.devices.attach(leaf, pid):
            raise Fault(f"the session process {pid} is gone")
        live.probed.setdefault(leaf, 0.0)
        return f"cgroup {self.cgroup_name(leaf)}"

    def _open_jit(self, user: str, rhost: str, service: str, pid: int,
                  actions: dict[str, str]) -> dict[str, Any]:
        try:
            jit = self._jit(user)
        except _LOOKUP_ERRORS as exc:
            raise Fault(f"JIT grants could not be checked: {str(exc)[:200]}") from None
        if not jit:
            self._record("ssh.session", user, rhost, service, pid=pid,
                         outcome="no_job", reason="no running job and no JIT grant",
                         action=actions.get("no_job", "deny"))
            return {"adopted": False, "job_id": None, "code": "no_job",
                    "message": f"ztgpu: you have no running job on {self.config.node_name}"}
        grant = jit[0]
        expires = str(grant.get("expires", ""))
        left = _seconds_until(expires)
        where = self._jit_cgroup(user, pid, str(grant.get("id")))
        start = holders.start_time(pid)
        with self.lock:
            if start is not None:
                self.adopted[pid] = Adopted(
                    pid=pid, start=start, user=user, rhost=rhost, service=service,
                    job_id=None, until=time.monotonic() + left, jit_id=str(grant.get("id")))
        self._record("ssh.session", user, rhost, service, pid=pid,
                     outcome="jit", reason=f"JIT admin access {grant.get('id')} until "
                                           f"{expires}; {where}"[:500])
        return {"adopted": False, "job_id": None,
                "message": f"ztgpu: JIT admin session until {expires}; it is recorded, "
                           f"has no GPU, and ends when the grant does"}

    def _jit_cgroup(self, user: str, pid: int, jit_id: str) -> str:
        """v1: an agent-made devices cgroup denying every GPU; else nothing to add."""
        if not self.v1:
            return "no cgroup (GPU files stay at rest)"
        from ztgpu.cgroups.device_allowlist import CharDevice

        cgroup = self.devices.ensure(f"{self.own_cgroup}/jit_{user}_{pid}")
        self.devices.deny(cgroup, [CharDevice(self.major, g.minor) for g in self.inventory])
        if not self.devices.attach(cgroup, pid):
            raise Fault(f"the session process {pid} is gone")
        return f"cgroup devices{self.cgroup_name(cgroup)}"

    def ssh_close(self, req: dict[str, Any], peer_pid: int) -> dict[str, Any]:
        user, rhost, service, _ = _parse(req)
        pid = self._session_pid(peer_pid, req.get("target"))
        with self.lock:
            entry = self.adopted.pop(pid, None)
        job = {"job_id": entry.job_id} if entry is not None and entry.job_id else {}
        self._record("ssh.session", user, rhost, service, pid=pid, outcome="closed",
                     reason="session closed", **job)
        return {"closed": True}

    # ---- background -----------------------------------------------------
    def check_sessions(self) -> None:
        """Adopted sessions still where they belong; JIT sessions end on time."""
        with self.lock:
            entries = list(self.adopted.values())
        now = time.monotonic()
        for entry in entries:
            if holders.start_time(entry.pid) != entry.start:
                with self.lock:
                    self.adopted.pop(entry.pid, None)
                continue
            if entry.job_id is None:
                if entry.until is not None and now >= entry.until:
                    self._end_jit(entry, "its JIT grant expired")
                continue
            with self.lock:
                live = self.jobs.get(entry.job_id)
            if live is None:
                continue  # the job ended: Slurm and the release take its processes
            if self._in_job(entry.pid, live):
                continue
            where = job_cgroups.unified_path_of(entry.pid) if self.steps is not None else \
                job_cgroups.devices_cgroup_of(entry.pid)
            outcome, reason = "moved_back", "put back into its job, with its processes"
            try:
                # Walked again until none is left outside: a process forked
                # while its parent was being moved back stays where the
                # parent was, and the next round sees only the parent.
                for _ in range(5):
                    strays = [m for m in _tree(entry.pid) if not self._in_job(m, live)]
                    if not strays:
                        break
                    for member in strays:
                        self._adopt(live, member)
            except (CgroupError, Fault) as exc:
                outcome, reason = "ended", f"could not be put back ({exc}); ended"
                _end_tree(entry.pid, entry.start)
            self.spool.append("ssh.escaped", user=entry.user, rhost=entry.rhost,
                              service=entry.service, job_id=entry.job_id, pid=entry.pid,
                              cgroup=str(where)[:300], action=outcome,
                              reason=("the session left its job's cgroups (pam_systemd after "
                                      "the ztgpu module moves sessions into a logind scope); "
                                      + reason)[:500])

    def _in_job(self, pid: int, live: LiveJob) -> bool:
        if self.steps is not None:
            path = job_cgroups.unified_path_of(pid)
            owner = job_cgroups.v2_job_of_path(path) if path else None
            return owner is not None and owner[0] == live.record.job_id
        # Both: the freezer says whose job it is, the devices cgroup confines it
        # (systemd manages devices but not freezer on v1, so logind moves one only).
        if job_cgroups.job_of_pid(pid) != (live.record.uid, live.record.job_id):
            return False
        devices = job_cgroups.devices_cgroup_of(pid)
        # Slurm's job cgroup or the agent's own one for the job (both job_<id>).
        return devices is not None and job_cgroups.in_job_cgroup(devices, live.record.job_id)

    def jit_revoked(self, user: str) -> None:
        """authd revoked *user*: end their JIT sessions now."""
        with self.lock:
            entries = [e for e in self.adopted.values()
                       if e.job_id is None and e.user == user]
        for entry in entries:
            self._end_jit(entry, "the user's access was revoked")

    def _end_jit(self, entry: Adopted, why: str) -> None:
        with self.lock:
            self.adopted.pop(entry.pid, None)
        _end_tree(entry.pid, entry.start)
        if self.v1:
            cgroup = self.devices.path(f"{self.own_cgroup}/jit_{entry.user}_{entry.pid}")
            if cgroup.exists() and not self.devices.remove(cgroup):
                self.stale_cgroups.add(cgroup)
        self.spool.append("ssh.session", user=entry.user, rhost=entry.rhost,
                          service=entry.service, pid=entry.pid, outcome="ended",
                          reason=f"JIT admin session {entry.jit_id} ended: {why}")


def _tree(pid: int) -> list[int]:
    """*pid* and every process below it (the session's shell and what it ran)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = job_cgroups.proc_info(int(entry.name))
            if info is not None:
                children.setdefault(info[0], []).append(int(entry.name))
    todo, tree = [pid], []
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _end_tree(pid: int, start: int) -> None:
    """SIGKILL the session process *pid* (if still the one started at *start*)
    and every process below it."""
    import signal

    if holders.start_time(pid) != start:
        return
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(member)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)


def _seconds_until(expires: str) -> float:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())
