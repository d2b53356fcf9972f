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
@click.option("--as-user", metavar="NAME", help="Started as root: hand the keys and TLS files to NAME, then serve as "
              "NAME (no capabilities, no_new_privs); what `bankllm install --foreground` runs.")
def serve(model, host, port, threads, keys_file, config, as_user):
    """Serve the model: OpenAI-compatible /v1, banking /api/v1, /health, /ready, /metrics (HTTPS with tls_cert)."""
    import uvicorn

    from ..service import privileges, tls
    from ..service.app import create_app
    from ..service.reload import serving

    settings = Settings.load(config=config, model=model, host=host, port=port, threads=threads, keys_file=keys_file)
    if as_user:
        flags = [arg for name, value in (("--config", config), ("--model", model), ("--host", host),
                                         ("--port", port), ("--threads", threads)) if value is not None
                 for arg in (name, str(value))]
        privileges.serve_as(as_user, settings, flags)  # does not return
    app = create_app(settings)
    privileges.refuse_root(settings)
    ssl_options = tls.uvicorn_options(settings)
    scheme = "https" if ssl_options else "http"
    mtls = " (client certificates required)" if settings.require_client_cert else ""
    click.echo(f"bankllm: serving {settings.model} as {settings.model_name!r} on {scheme}://{settings.host}:"
               f"{settings.port}{mtls}", err=True)
    with serving(app.state["service"], settings.resolved_run_dir()):  # SIGHUP reloads the keys
        uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="warning",
                    server_header=False, timeout_graceful_shutdown=10, **ssl_options)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
