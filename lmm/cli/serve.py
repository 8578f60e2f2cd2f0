"""`lmm serve`: parse the options, load the model, run the OpenAI-compatible app under uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

HELP = (
    "Serve a model over an OpenAI-compatible HTTP API (needs the serve extra: fastapi, uvicorn).\n\n"
    'Endpoints: POST /v1/chat/completions (text + image_url parts as data: URLs; "stream": true for server-sent '
    "events), GET /v1/models, GET /health, GET /stats (batching counters). Concurrent requests with the same "
    "settings are answered in one batched forward. temperature omitted or 0 means greedy decoding.\n\n"
    "  lmm serve --model runs/my-model --port 8000 --api-key secret\n"
    "  curl -H 'Authorization: Bearer secret' http://127.0.0.1:8000/v1/models\n"
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command("serve", help=HELP)
    def serve_command(
        model: str = typer.Option(..., "--model", help="A save_pretrained directory or a preset name."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
        port: int = typer.Option(8000, "--port", help="TCP port."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMM_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on every request."),
        served_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                  help="Model id clients send (default: the folder's name)."),
        allow_local_dir: Optional[Path] = typer.Option(None, "--allow-local-dir", exists=True, file_okay=False,
                                                       help="Allow file:// image URLs inside this directory."),
        max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Most requests in one forward."),
        batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0,
                                            help="How long the batcher waits for more requests."),
        max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Answer length when a request sets none."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if any)."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    ):
        try:
            import uvicorn

            from lmm.serve.app import create_app
        except ModuleNotFoundError as e:
            raise typer.BadParameter(f"`lmm serve` needs {e.name}: pip install 'lmm[serve]'") from None
        from lmm.cli.chat import load_model

        if not _is_loopback(host) and not api_key:
            typer.secho(f"warning: binding {host} without --api-key: anyone who can reach this port can use the model",
                        fg="yellow", err=True)
        lmm_model = load_model(model, device)
        name = served_name or Path(model).name
        web_app = create_app(lmm_model, name, api_key=api_key, allow_local_dir=allow_local_dir,
                             max_batch_size=max_batch_size, max_wait_ms=batch_wait_ms, default_max_tokens=max_tokens)
        typer.echo(f"lmm serve: model {name!r} on http://{host}:{port}/v1", err=True)
        uvicorn.run(web_app, host=host, port=port, log_level=log_level)
