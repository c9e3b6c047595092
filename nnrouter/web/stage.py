"""The web stage: Uvicorn serving the console, as a child of ``serve`` or alone (``nnrouter web``).

Uvicorn runs on this process's main thread with its own signal handling
(SIGTERM and SIGINT end it gracefully); as a child of ``serve`` a watcher
also ends it when the supervisor is gone, like every other stage.
"""

from __future__ import annotations

import threading
from multiprocessing.process import BaseProcess
from typing import Any

from nnrouter.core import logs
from nnrouter.core.config import Settings
from nnrouter.service import lifecycle

log = logs.get("nnrouter.web")


def run_web(settings: Settings, stop: Any = None, parent_pid: int | None = None, expect_stages: bool = True) -> None:
    import uvicorn

    from nnrouter.web.app import create_app

    opened = lifecycle.open_stage(settings, "web", stop, parent_pid)
    if opened is None:
        return
    stop, store = opened
    http = settings.http
    config = uvicorn.Config(
        create_app(settings, store, expect_stages=expect_stages),
        host=http.bind,
        port=http.port,
        log_config=None,  # structlog's lines only; uvicorn's access log would carry every URL at info
        access_log=False,
        ssl_certfile=str(http.tls.cert) if http.tls else None,
        ssl_keyfile=str(http.tls.key) if http.tls else None,
        # Only a proxy the admin named may say who the client is: login tries are counted by that address.
        proxy_headers=bool(http.trusted_proxies),
        forwarded_allow_ips=http.trusted_proxies or None,
        server_header=False,
    )
    server = uvicorn.Server(config)

    def follow_stop() -> None:  # the parent's death (watch_parent) sets ``stop``; uvicorn only knows its signals
        stop.wait()
        server.should_exit = True

    threading.Thread(target=follow_stop, name="nnrouter-web-stop", daemon=True).start()
    log.info("web_started", bind=http.bind, port=http.port, tls=http.tls is not None)
    try:
        server.run()
    finally:
        store.dispose()
        log.info("web_stopped")


def spawn_web(settings: Settings, name: str = "nnrouter-web") -> BaseProcess:
    """The web stage as a child process of ``serve``: it stops on SIGTERM and dies with its parent."""
    return lifecycle.spawn_stage("nnrouter.web.stage:run_web", name, settings=settings)
