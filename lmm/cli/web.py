"""`lmm web`: parse the options, load the model, serve the gradio chat page (`lmm.web`)."""

from __future__ import annotations

import typer

HELP = """A chat page in the browser: upload images and ask about them (needs the web extra: gradio).

  lmm web --model runs/my-model --port 7860     # then open http://127.0.0.1:7860

The page has NO authentication: anyone who can reach the port can use the model. It binds to 127.0.0.1 by
default; --host 0.0.0.0 (or --share) exposes it, with a warning. Uploads are downscaled to the model's input
size when they arrive, and uploads over --max-image-pixels (read from the image header) are refused.
"""


def register(app: typer.Typer) -> None:
    @app.command("web", help=HELP)
    def web_command(
        model: str = typer.Option(..., "--model", help="A save_pretrained directory or a preset name."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
        port: int = typer.Option(7860, "--port", help="TCP port."),
        title: str | None = typer.Option(None, "--title", help="Page title (default: the model's name)."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest answer in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; >0: sample."),
        share: bool = typer.Option(False, "--share", help="Ask gradio for a public share link (needs internet)."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if any)."),
        max_image_pixels: int = typer.Option(
            50_000_000,
            "--max-image-pixels",
            min=1,
            help="Largest upload in pixels (from its header); larger ones are refused.",
        ),
    ):
        try:
            import gradio  # noqa: F401  (fail early, before loading the model)

            from lmm.web import launch
        except ModuleNotFoundError as e:
            raise typer.BadParameter(f"`lmm web` needs {e.name}: pip install gradio (the web extra)") from None
        from lmm.cli.chat import load_model
        from lmm.cli.serve import _is_loopback

        if share or not _is_loopback(host):
            where = "a public gradio share link" if share else f"{host}:{port}"
            typer.secho(
                f"warning: the page has no authentication; serving it on {where} lets anyone who can reach "
                "it use the model",
                fg="yellow",
                err=True,
            )
        lmm_model = load_model(model, device)
        sample = temperature > 0
        typer.echo(f"lmm web: http://{host}:{port}", err=True)
        launch(
            lmm_model,
            host=host,
            port=port,
            title=title,
            share=share,
            max_new_tokens=max_new_tokens,
            max_image_pixels=max_image_pixels,
            do_sample=sample,
            temperature=temperature if sample else 1.0,
        )
