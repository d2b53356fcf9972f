"""`bankllm serve`: the OpenAI-compatible and banking API on one process."""

from __future__ import annotations

import click

from ..settings import Settings
from .options import PATH, config_option, keys_file_option, threads_option


@click.command("serve")
@click.option("--model", type=PATH, help="GGUF file or build directory (default: the `model` setting).")
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="TCP port (default 8080).")
@threads_option
@keys_file_option("API key hash file (default: $CREDENTIALS_DIRECTORY/api-keys).")
@config_option
def serve(model, host, port, threads, keys_file, config):
    """Serve the model: OpenAI-compatible /v1, banking /api/v1, /health, /ready, /metrics."""
    import uvicorn

    from ..service.app import create_app
    from ..service.reload import serving

    settings = Settings.load(config=config, model=model, host=host, port=port, threads=threads, keys_file=keys_file)
    app = create_app(settings)
    click.echo(f"bankllm: serving {settings.model} as {settings.model_name!r} on http://{settings.host}:{settings.port}",
               err=True)
    with serving(app.state["service"], settings.resolved_run_dir()):  # SIGHUP reloads the keys
        uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="warning",
                    server_header=False, timeout_graceful_shutdown=10)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
