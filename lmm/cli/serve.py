"""`lmm serve`: parse the options, load the model, run the OpenAI-compatible app under uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

HELP = (
    "Serve a model over an OpenAI-compatible HTTP API (needs the serve extra: fastapi, uvicorn).\n\n"
    'Endpoints: POST /v1/chat/completions (text + image_url parts as data: URLs; "stream": true for server-sent '
    "events), GET /v1/models, GET /health, GET /stats (batching counters). Concurrent requests with the same "
    "settings are answered in one batched forward. temperature omitted or 0 means greedy decoding.\n\n"
    "  lmm serve --model runs/my-model --port 8000 --api-key secret\n"
    "  curl -H 'Authorization: Bearer secret' http://127.0.0.1:8000/v1/models\n\n"
    "Limits (requests are untrusted; each refusal is a 400/408/413 with an OpenAI error body): the body however "
    "it is sent (--max-body-mb, --body-timeout), images per request (--max-images), pixels per image and per "
    "request read from the image headers before anything is decoded (--max-image-pixels, --max-request-pixels; "
    "sides more unequal than 200:1 are refused too), text per request before tokenising (--max-text-chars), video "
    "parts (--max-videos, --max-video-mb) and audio parts (--max-audios, --max-audio-mb, --max-audio-seconds, the "
    "duration read from the clip's header). "
    "Slow clients: request headers must arrive within --header-timeout seconds, idle connections close after "
    "--keep-alive-timeout, and connections beyond --max-connections get a 503. A non-streamed request whose "
    "client disconnects is cancelled before it reaches the model.\n"
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
        api_key: str | None = typer.Option(
            None, "--api-key", envvar="LMM_API_KEY", help="Require 'Authorization: Bearer KEY' on every request."
        ),
        served_name: str | None = typer.Option(
            None, "--served-model-name", help="Model id clients send (default: the folder's name)."
        ),
        allow_local_dir: Path | None = typer.Option(
            None,
            "--allow-local-dir",
            exists=True,
            file_okay=False,
            help="Allow file:// image URLs inside this directory.",
        ),
        max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Most requests in one forward."),
        batch_wait_ms: float = typer.Option(
            10.0, "--batch-wait-ms", min=0, help="How long the batcher waits for more requests."
        ),
        max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Answer length when a request sets none."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if any)."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
        max_body_mb: float = typer.Option(
            64.0, "--max-body-mb", min=0.001, help="Largest request body in MiB (Content-Length or chunked): 413."
        ),
        max_images: int = typer.Option(16, "--max-images", min=1, help="Most images in one request: 400."),
        max_image_pixels: int = typer.Option(
            40_000_000, "--max-image-pixels", min=1, help="Most pixels in one image, from its header: 413."
        ),
        max_request_pixels: int = typer.Option(
            64_000_000,
            "--max-request-pixels",
            min=1,
            help="Most pixels in all images of one request, from their headers: 413.",
        ),
        max_text_chars: int | None = typer.Option(
            None,
            "--max-text-chars",
            min=1,
            help="Most characters of text in one request, checked before "
            "tokenising: 413 (default: 32 per token of the model's "
            "context).",
        ),
        max_videos: int = typer.Option(4, "--max-videos", min=1, help="Most video_url parts in one request: 400."),
        max_video_mb: float = typer.Option(50.0, "--max-video-mb", min=0.001, help="Largest video in MiB: 413."),
        max_audios: int = typer.Option(8, "--max-audios", min=1, help="Most input_audio parts in one request: 400."),
        max_audio_mb: float = typer.Option(25.0, "--max-audio-mb", min=0.001, help="Largest audio clip in MiB: 413."),
        max_audio_seconds: float = typer.Option(
            600.0, "--max-audio-seconds", min=0.001, help="Longest audio clip, from its header: 413."
        ),
        body_timeout: float = typer.Option(
            60.0, "--body-timeout", min=0.001, help="Seconds for a request body to arrive: 408."
        ),
        header_timeout: float = typer.Option(
            10.0,
            "--header-timeout",
            min=0.001,
            help="Seconds for a request's headers to arrive: 408, connection closed.",
        ),
        keep_alive_timeout: int = typer.Option(
            5, "--keep-alive-timeout", min=1, help="Seconds an idle keep-alive connection stays open."
        ),
        max_connections: int = typer.Option(
            256, "--max-connections", min=1, help="Most open connections; more get a 503 and are closed."
        ),
        compile: bool = typer.Option(
            False,
            "--compile",
            help="torch.compile the decode step over a static KV cache; each batch size compiles on first use.",
        ),
    ):
        try:
            import uvicorn  # noqa: F401  (fail early, before loading the model)

            from lmm.serve.app import create_app
            from lmm.serve.http import run
            from lmm.serve.protocol import Limits
        except ModuleNotFoundError as e:
            raise typer.BadParameter(f"`lmm serve` needs {e.name}: pip install 'lmm[serve]'") from None
        from lmm.cli.chat import load_model

        if not _is_loopback(host) and not api_key:
            typer.secho(
                f"warning: binding {host} without --api-key: anyone who can reach this port can use the model",
                fg="yellow",
                err=True,
            )
        limits = Limits(
            max_body_bytes=int(max_body_mb * 2**20),
            max_images=max_images,
            max_image_pixels=max_image_pixels,
            max_request_pixels=max_request_pixels,
            max_text_chars=max_text_chars,
            max_videos=max_videos,
            max_video_bytes=int(max_video_mb * 2**20),
            max_audios=max_audios,
            max_audio_bytes=int(max_audio_mb * 2**20),
            max_audio_seconds=max_audio_seconds,
            body_timeout=body_timeout,
        )
        lmm_model = load_model(model, device)
        name = served_name or Path(model).name
        web_app = create_app(
            lmm_model,
            name,
            api_key=api_key,
            allow_local_dir=allow_local_dir,
            max_batch_size=max_batch_size,
            max_wait_ms=batch_wait_ms,
            default_max_tokens=max_tokens,
            limits=limits,
            decode={"compile": True} if compile else None,
        )
        typer.echo(f"lmm serve: model {name!r} on http://{host}:{port}/v1", err=True)
        run(
            web_app,
            host=host,
            port=port,
            log_level=log_level,
            header_timeout=header_timeout,
            keep_alive_timeout=keep_alive_timeout,
            max_connections=max_connections,
        )
