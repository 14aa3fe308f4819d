"""``ztgpu-collectord``: run the central audit collector until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from ztgpu.errors import ConfigError

log = logging.getLogger("ztgpu.collector")


def serve(config_file: str | None, port_file: Path | None = None) -> int:
    """Run the collector configured in ``config_file``; returns the exit code."""
    from ztgpu import __version__
    from ztgpu.collector.service import CollectorService
    from ztgpu.collector.sinks import start_sinks
    from ztgpu.collector.store import Store, open_store
    from ztgpu.config import load_config, read_secret_file
    from ztgpu.metrics import HttpMetrics
    from ztgpu.net.tls_server import port_file_writer, run_until_stopped
    from ztgpu.trust.pki import ReloadingContext, load_cert, server_context

    config = load_config(config_file)
    cc = config.collector
    if config.tls.cert is None or config.tls.key is None:
        raise ConfigError("tls.cert and tls.key must name the collector's certificate and key "
                          "(ztgpu pki issue --role service --name <host>)")
    ca_cert, cert, key = config.tls.ca_cert, config.tls.cert, config.tls.key
    # Renewed certificates are picked up by the next handshake, no restart needed.
    context = ReloadingContext(lambda: server_context(ca_cert, cert, key), [cert, key, ca_cert])
    from cryptography.hazmat.primitives.serialization import Encoding

    ca_der = load_cert(config.tls.ca_cert).public_bytes(Encoding.DER)
    dsn = (read_secret_file(cc.postgres_dsn_file, "collector.postgres_dsn_file")
           if cc.store == "postgres" and cc.postgres_dsn_file is not None else None)

    def make_store() -> Store:
        return open_store(cc.store, own_node=cc.name, sqlite_path=cc.sqlite_path, dsn=dsn)

    writer, reader = make_store(), make_store()
    store_args = {"kind": cc.store, "own_node": cc.name, "sqlite_path": cc.sqlite_path,
                  "dsn": dsn}
    service = CollectorService(
        writer=writer, reader=reader, ca_cert_der=ca_der, server_context=context.get,
        max_body_bytes=cc.max_body_bytes, max_batch_events=cc.max_batch_events,
        max_page_events=cc.max_page_events, store_args=store_args,
        ingest_processes=cc.ingest_processes, metrics=HttpMetrics())
    writer.record("collector.start", version=__version__, store=cc.store)

    ready = port_file_writer(port_file)

    async def run(stop: asyncio.Event) -> None:
        sinks = start_sinks(config, make_store)
        service.on_stored = sinks.wake
        try:
            await service.serve(cc.listen_host, cc.listen_port, stop, ready)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, sinks.stop)

    try:
        run_until_stopped(run)
    finally:
        service.close()
        writer.record("collector.stop", reason="signal")
        writer.close()
        reader.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from ztgpu.net.tls_server import service_main

    return service_main("ztgpu-collectord", __doc__, serve, argv)

if __name__ == "__main__":
    sys.exit(main())
