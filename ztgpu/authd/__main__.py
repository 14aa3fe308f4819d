"""``ztgpu-authd``: the central decision point (MFA, policy, grants, revocation)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from ztgpu.config import Config, load_config, read_secret_file
from ztgpu.errors import ConfigError

log = logging.getLogger("ztgpu.authd")


def open_authority(config: Config, *, with_holder: bool = True,
                   metrics: Any = None) -> tuple[Any, Any, Any]:
    """(authority, store, spool) for ``config``; the caller closes store and spool.
    With *metrics* (``ztgpu.metrics.Metrics``) every event is counted."""
    from ztgpu.audit.spool import Spool
    from ztgpu.authd.authority import Authority
    from ztgpu.authd.holder import SlurmJobHolder
    from ztgpu.authd.store import AuthStore
    from ztgpu.metrics import CountingSink
    from ztgpu.slurm.client import CliSlurmClient
    from ztgpu.sqldb import open_database
    from ztgpu.trust.kek import KeyRingFile

    ac = config.authd
    keyring = KeyRingFile(ac.kek_file)
    dsn = (read_secret_file(ac.postgres_dsn_file, "authd.postgres_dsn_file")
           if ac.store == "postgres" and ac.postgres_dsn_file is not None else None)
    store = AuthStore(open_database(ac.store, sqlite_path=ac.sqlite_path, dsn=dsn))
    spool = Spool.open(config.paths.spool_dir / "authd-events.db", ac.name)
    holder = (SlurmJobHolder(CliSlurmClient(config.slurm.bin_dir, config.slurm.conf,
                                            config.slurm.command_timeout_s))
              if with_holder else None)
    events: Any = spool if metrics is None else CountingSink(spool, metrics)
    authority = Authority(store=store, keyring=keyring, config=ac, events=events, holder=holder)
    authority.policy()  # refuse to start with a bad policy file
    return authority, store, spool


def gate_uids(ac: Any) -> frozenset[int]:
    """The uids that may ask the gate on ``authd.gate_socket``: root, authd's own, and
    ``authd.gate_socket_users`` (ConfigError naming one that does not exist)."""
    import os
    import pwd

    if ac.gate_socket is None:
        return frozenset()
    uids = {0, os.geteuid()}
    for name in ac.gate_socket_users:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ConfigError(f"authd.gate_socket_users: user {name!r} does not exist "
                              "(name SlurmUser, the user slurmctld runs its PrologSlurmctld "
                              "as)") from None
    return frozenset(uids)


def serve(config_file: str | None, port_file: Path | None = None) -> int:
    from ztgpu import __version__
    from ztgpu.authd.service import AuthService
    from ztgpu.net.tls_server import port_file_writer, run_until_stopped
    from ztgpu.trust.pki import ReloadingContext, server_context

    config = load_config(config_file)
    ac = config.authd
    ca_cert, cert, key = config.tls.ca_cert, config.tls.cert, config.tls.key
    if cert is None or key is None:
        raise ConfigError("tls.cert and tls.key must name authd's certificate and key "
                          "(ztgpu pki issue --role service --name <host>)")
    context = ReloadingContext(lambda: server_context(ca_cert, cert, key, client_cert=False),
                               [cert, key, ca_cert])
    from ztgpu.metrics import HttpMetrics

    metrics = HttpMetrics()
    authority, store, spool = open_authority(config, metrics=metrics)
    service = AuthService(authority, server_context=context.get,
                          max_body_bytes=ac.max_body_bytes, gate_uids=gate_uids(ac),
                          metrics=metrics)
    from ztgpu.audit.forwarder import start_forwarder

    # authd's decisions go to the collector like a node's events, under its
    # own certificate (role service, named authd.name).
    forwarder = start_forwarder(config, spool, role="service", name=ac.name)
    spool.append("auth.start", version=__version__, store=ac.store, outcome="ok")

    ready = port_file_writer(port_file)

    async def run(stop: asyncio.Event) -> None:
        local: asyncio.Task[None] | None = None
        if ac.gate_socket is not None:
            # Listen on the gate socket before the TLS port is announced ready.
            listening = asyncio.Event()
            local = asyncio.create_task(service.serve_gate_socket(
                ac.gate_socket, stop, lambda _: listening.set()))
            waiter = asyncio.create_task(listening.wait())
            await asyncio.wait({local, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if local.done():
                local.result()  # a socket that could not be made: raise why
        try:
            await service.serve(ac.listen_host, ac.listen_port, stop, ready)
        finally:
            stop.set()
            if local is not None:
                await local

    try:
        run_until_stopped(run)
    finally:
        service.close()
        spool.append("auth.stop", reason="signal", outcome="ok")
        if forwarder is not None:
            forwarder.flush(timeout=2.0)
            forwarder.stop()
        store.close()
        spool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from ztgpu.net.tls_server import service_main

    return service_main("ztgpu-authd", __doc__, serve, argv)

if __name__ == "__main__":
    sys.exit(main())
