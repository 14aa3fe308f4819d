"""``ztgpu-noded``: the node agent daemon (runs as root, in the foreground)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ztgpu.config import Config, load_config
from ztgpu.errors import ConfigError, Denied, InputRejected, ZtgpuError

if TYPE_CHECKING:
    from ztgpu.audit.forwarder import Forwarder
    from ztgpu.audit.spool import Spool
    from ztgpu.noded.agent import Agent
    from ztgpu.noded.grant_check import RevocationWatcher


def _allowed_uids(config: Config) -> set[int]:
    uids = {0}
    if config.slurm.user is None:
        return uids
    try:
        uids.add(pwd.getpwnam(config.slurm.user).pw_uid)
    except KeyError:
        logging.getLogger("ztgpu.noded").info(
            "slurm.user %r does not exist; only root may use the socket", config.slurm.user)
    return uids


class _WakingSink:
    """The spool as the agent sees it: each new event wakes the forwarder."""

    def __init__(self, spool: Spool, forwarder: Forwarder) -> None:
        self.spool = spool
        self.forwarder = forwarder

    def append(self, code: str, **fields: Any) -> dict[str, Any]:
        event = self.spool.append(code, **fields)
        self.forwarder.wake()
        return event


def _start_grant_checks(config: Config, agent: Agent) -> RevocationWatcher | None:
    """With ``auth.authd_url``: every grant needs authd's signed grant; watch revocations."""
    from ztgpu.noded.grant_check import GrantChecker, RevocationWatcher
    from ztgpu.trust.pki import ReloadingContext, client_context

    auth = config.auth
    if auth.authd_url is None:
        logging.getLogger("ztgpu.noded").warning(
            "auth.authd_url is not set: GPUs are granted by Slurm's allocation alone, "
            "without MFA-backed grants")
        return None
    cert, key, ca_cert = config.tls.cert, config.tls.key, config.tls.ca_cert
    if cert is None or key is None:
        raise ConfigError("auth.authd_url needs tls.cert and tls.key (this node's "
                          "certificate)")
    context = ReloadingContext(lambda: client_context(ca_cert, cert, key), [cert, key, ca_cert])
    if auth.grant_keys_file is None:
        logging.getLogger("ztgpu.noded").warning(
            "auth.grant_keys_file is not set: grants are verified against the keys authd "
            "serves (/v1/jwks), not pinned ones")
    checker = GrantChecker(auth.authd_url, context.get, config.node_name,
                           timeout_s=auth.request_timeout_s,
                           unreachable_action=auth.unreachable_action,
                           pinned_keys=auth.grant_keys_file)
    agent.grant_checker = checker
    # Started by the caller once the agent has loaded its state: a revocation
    # acted on before that would find no job and be passed over.
    agent.jit_lookup = checker.jit

    def on_revoke(user: str, reason: str, at: str) -> None:
        agent.revoke_user(user, reason, at)
        agent.jit_revoked(user)

    return RevocationWatcher(checker, on_revoke, auth.revocation_poll_s)


def serve(config: Config, ready: threading.Event | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT. Returns the exit code."""
    # Heavy imports stay here, out of the thin clients' way.
    from ztgpu.audit.forwarder import start_forwarder
    from ztgpu.audit.spool import Spool
    from ztgpu.gpu.devices import MajorSource, nvidia_major
    from ztgpu.gpu.select import open_backend
    from ztgpu.net.ratelimit import RejectLimiter
    from ztgpu.noded.agent import Agent
    from ztgpu.noded.backlog import SpoolGuard
    from ztgpu.noded.checks import require_trusted_paths
    from ztgpu.noded.server import AgentSocketServer, Peer
    from ztgpu.noded.state import StateStore
    from ztgpu.slurm.client import CliSlurmClient

    log = logging.getLogger("ztgpu.noded")
    # What the agent trusts (its state, its spool, the sockets the hooks talk to)
    # must be changeable by root alone, all the way up.
    require_trusted_paths(config, ("paths.state_dir", "paths.spool_dir",
                                   "the directory of paths.socket",
                                   "the directory of paths.task_socket"))
    backend = open_backend(config.gpu)
    major = nvidia_major()
    if backend.simulated and config.gpu.simulated_major is not None:
        major = MajorSource(major=config.gpu.simulated_major, from_proc=False)
        log.info("simulated GPU device files carry major %d", major.major)
    elif not major.from_proc:
        log.info("no NVIDIA driver in /proc/devices; using major %d", major.major)
    if backend.simulated:
        log.warning("GPU backend is SIMULATED (%d GPUs declared in config): no real GPU is "
                    "protected on this node", len(config.gpu.simulated))
    spool = Spool.open(config.paths.spool_dir / "events.db", config.node_name)
    state = StateStore(config.paths.state_dir / "state.db")
    slurm = CliSlurmClient(config.slurm.bin_dir, config.slurm.conf,
                           config.slurm.command_timeout_s)
    guard = SpoolGuard(spool, config.audit.spool_max_events, config.audit.spool_full_action)
    forwarder = start_forwarder(config, spool, role="node", name=config.node_name,
                                on_progress=guard.check)
    from ztgpu.metrics import CountingSink
    from ztgpu.noded.metrics import NodeMetrics

    metrics = NodeMetrics()
    sink = CountingSink(spool if forwarder is None else _WakingSink(spool, forwarder), metrics)
    agent = Agent(config, backend, sink, state, slurm, major=major.major)
    metrics.attach(agent, None if forwarder is None else spool.backlog)
    watcher = _start_grant_checks(config, agent)
    if forwarder is not None:
        # Without a collector nothing is ever acknowledged, so the bound
        # applies only while forwarding.
        guard.on_full = agent.on_spool_full
        agent.guard = guard
        fwd = forwarder

        def audit_status() -> dict[str, Any]:
            return {**fwd.status(), **spool.backlog(), "limit": guard.limit,
                    "full": guard.full, "full_action": guard.action}

        agent.audit_status = audit_status
        guard.check()
    agent.start()
    if watcher is not None:
        watcher.start()

    def on_reject(uid: int, reason: str) -> None:
        spool.append("request.rejected", peer_uid=uid, reason=reason[:300],
                     outcome="rejected")

    task_rejects = RejectLimiter(on_reject)

    def handle_task(op: str, req: dict[str, Any], peer: Peer) -> Any:
        if op != "confine":
            task_rejects(peer.uid, f"unknown op {op[:40]!r} on the task socket")
            raise InputRejected("the task socket serves only 'confine'")
        return agent.confine_task(peer.pid, peer.uid)

    def handle(op: str, req: dict[str, Any], peer: Peer) -> Any:
        began, outcome = time.monotonic(), "error"
        try:
            result = dispatch(op, req, peer)
            outcome = "ok"
            return result
        except (Denied, InputRejected):
            outcome = "refused"
            raise
        finally:
            known = op if op in KNOWN_OPS else "unknown"
            metrics.requests.labels(known, outcome).observe(time.monotonic() - began)

    def dispatch(op: str, req: dict[str, Any], peer: Peer) -> Any:
        if op == "ping":
            return {"pong": True}
        if op == "prolog":
            return agent.prolog(req.get("job"))
        if op == "epilog":
            return agent.epilog(req.get("job"))
        if op == "refused":
            return agent.refused(req.get("hook"), req.get("reason"), req.get("job_id"))
        if op == "status":
            return agent.status()
        if op == "verify":
            job_id = req.get("job_id")
            if job_id is not None and not isinstance(job_id, str):
                raise InputRejected("'job_id' must be a string")
            agent.sweep()
            return agent.verify(job_id)
        if op == "drift":
            return agent.check_drift()
        if op in ("ssh_account", "ssh_open", "ssh_close", "ssh_auth", "ssh_mfa"):
            if peer.uid != 0:
                raise Denied("only root (sshd's PAM stack) may ask about SSH sessions")
            if op == "ssh_account":
                return agent.ssh_account(req, peer.pid)
            if op == "ssh_auth":
                return agent.ssh_auth(req)
            if op == "ssh_mfa":
                return agent.ssh_mfa(req, peer.pid)
            if op == "ssh_open":
                return agent.ssh_open(req, peer.pid)
            return agent.ssh_close(req, peer.pid)
        if op == "assessed":
            if peer.uid != 0:
                raise Denied("only root may record an assessment")
            return agent.record_assessment(req.get("findings"), req.get("facts_sha256"))
        if op == "recover":
            if peer.uid != 0:
                raise Denied("only root may recover the node")
            return agent.recover(release_held=req.get("release_held") is not False)
        on_reject(-1, f"unknown op {op[:40]!r}")
        raise InputRejected(f"unknown op {op[:40]!r}")

    server = AgentSocketServer(config.paths.socket, handle, allowed_uids=_allowed_uids(config),
                               max_bytes=config.noded.request_max_bytes,
                               timeout_s=config.noded.request_timeout_s, on_reject=on_reject)
    slurm_uids = _allowed_uids(config) - {0}
    if slurm_uids:
        # A non-root SlurmdUser runs the Prolog/Epilog: let it reach the socket
        # file too (root always can); the peer check above still applies.
        os.chown(config.paths.socket, min(slurm_uids), 0)
    task_server = AgentSocketServer(config.paths.task_socket, handle_task, allowed_uids=None,
                                    max_bytes=4096, timeout_s=config.noded.request_timeout_s,
                                    on_reject=task_rejects, mode=0o666)
    threading.Thread(target=task_server.serve_forever, kwargs={"poll_interval": 0.2},
                     name="task-socket", daemon=True).start()
    stop_reason = ["signal"]

    def on_signal(signum: int, _frame: object) -> None:
        stop_reason[0] = signal.Signals(signum).name
        threading.Thread(target=server.shutdown, daemon=True).start()
        threading.Thread(target=task_server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run_background()
    metrics_server = _serve_metrics(config, metrics)
    log.info("ztgpu-noded serving on %s (node %s, %d GPUs, backend %s)", config.paths.socket,
             config.node_name, len(agent.inventory), backend.name)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        task_server.server_close()
        for path in (config.paths.socket, config.paths.task_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if metrics_server is not None:
            metrics_server.stop()
        agent.stop(stop_reason[0])
        if watcher is not None:
            watcher.stop()
        if forwarder is not None:
            forwarder.flush(timeout=2.0)  # best effort: agent.stop should reach the collector
            forwarder.stop()
        state.close()
        spool.close()
        backend.close()
        log.info("ztgpu-noded stopped (%s)", stop_reason[0])
    return 0


#: The socket's operations (a label of ``ztgpu_request_duration_seconds``;
#: anything else counts as ``unknown``, so a client cannot grow the series).
KNOWN_OPS = frozenset({"ping", "prolog", "epilog", "refused", "status", "verify", "drift",
                       "ssh_account", "ssh_open", "ssh_close", "ssh_auth", "ssh_mfa",
                       "recover", "assessed"})


def _serve_metrics(config: Config, metrics: Any) -> Any:
    """Serve /metrics at ``telemetry.metrics_listen`` (HTTPS, asking for a
    client certificate, with ``telemetry.metrics_cert``); a port that cannot
    be had is logged, never fatal: grants do not depend on it."""
    listen = config.telemetry.metrics_listen
    if listen is None:
        return None
    from ztgpu.net.metrics_http import MetricsServer, parse_listen

    log = logging.getLogger("ztgpu.noded")
    context = None
    telemetry = config.telemetry
    if telemetry.metrics_cert is not None and telemetry.metrics_key is not None:
        from ztgpu.trust.pki import ReloadingContext, server_context

        cert, key, ca = telemetry.metrics_cert, telemetry.metrics_key, config.tls.ca_cert
        context = ReloadingContext(lambda: server_context(ca, cert, key), [cert, key, ca]).get
    try:
        server = MetricsServer(parse_listen(listen), metrics.render, context).start()
    except OSError as exc:
        log.error("cannot serve metrics on %s: %s", listen, exc)
        return None
    log.info("metrics on %s://%s:%d/metrics", "https" if context else "http",
             parse_listen(listen)[0], server.port)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ztgpu-noded", description=__doc__)
    parser.add_argument("--config", help="config file (default: $ZTGPU_CONFIG or "
                        "/etc/ztgpu/ztgpu.yaml)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ZtgpuError as exc:
        print(f"ztgpu-noded: {exc}", file=sys.stderr)
        return exc.exit_code
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.paths.log_file is not None:
        handlers.append(logging.FileHandler(config.paths.log_file))
    logging.basicConfig(level=config.noded.log_level.upper(), handlers=handlers,
                        format="%(asctime)s ztgpu-noded[%(process)d] %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("ztgpu-noded: must run as root (it changes device files and cgroups)",
              file=sys.stderr)
        return 2
    try:
        return serve(config)
    except ZtgpuError as exc:
        logging.getLogger("ztgpu.noded").critical("cannot start: %s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
