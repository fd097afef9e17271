"""`tierserve serve`: the OpenAI-compatible server (FastAPI + uvicorn) around one async engine loop."""
from __future__ import annotations

import logging
import signal
from typing import Optional

import typer

from tierserve.cli_options import engine_options


@engine_options()
def serve(model: Optional[str] = typer.Option(None, help="checkpoint dir (default: embedded tierserve-nano)"),
          host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)"),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
          api_key: Optional[str] = typer.Option(None, envvar="TIERSERVE_API_KEY",
                                                help="require 'Authorization: Bearer KEY' (not on /health)"),
          served_model_name: Optional[str] = typer.Option(None, help="model name clients send (default: --model)"),
          shutdown_timeout: float = typer.Option(30.0, min=0,
                                                 help="on SIGTERM, seconds to let in-flight requests finish"),
          log_level: str = typer.Option("info", help="critical | error | warning | info | debug"),
          engine_settings: dict = None) -> None:
    """Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, /metrics, ..."""
    try:
        import uvicorn

        from tierserve.server.app import build_app
    except ModuleNotFoundError as e:
        typer.secho(f"error: `tierserve serve` needs {e.name}: pip install 'tierserve[server]'", fg="red", err=True)
        raise typer.Exit(2)
    from tierserve.config import EngineConfig
    from tierserve.engine.engine import Engine

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine(EngineConfig.from_kwargs(model=model, **engine_settings), progress=False)
    except (ValueError, FileNotFoundError, TypeError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2)
    name = served_model_name or model or "tierserve-nano"
    app = build_app(engine, name, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=shutdown_timeout, access_log=log_level.lower() == "debug")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught after its graceful shutdown; with these handlers in place
    # that is a no-op, so SIGTERM / Ctrl-C end the process with status 0 once in-flight work is done.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        raise typer.Exit(1)      # e.g. the port was taken
