"""`bankllm sign`: the bank's ed25519 key pair, and signing or verifying a build directory."""

from __future__ import annotations

import click

from .options import PATH


class _SignGroup(click.Group):
    """`bankllm sign BUILD_DIR --key KEY` is short for `bankllm sign dir BUILD_DIR --key KEY`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["dir", *args]
        return super().parse_args(ctx, args)


@click.group("sign", cls=_SignGroup)
def sign():
    """Sign build directories (and make the key pair) so that install and serve can verify them."""


@sign.command("keygen")
@click.option("--out", required=True, type=PATH, help="Directory for bankllm-signing.key (0600) and .pub.")
def keygen(out):
    """Make an ed25519 key pair: keep the private key off the servers; give them the .pub (`--trust`)."""
    from ..signing import generate_keys, key_id, load_public_key

    private, public = generate_keys(out)
    click.echo(f"private key {private} (0600: keep it offline, it signs bundles and builds)")
    click.echo(f"public key {public} (key id {key_id(load_public_key(public))}: pass it to "
               f"`bankllm install --trust`)")


@sign.command("dir")
@click.argument("build_dir", type=PATH)
@click.option("--key", required=True, type=PATH, help="The private key from `bankllm sign keygen`.")
def sign_dir(build_dir, key):
    """Sign every file of a build directory (writes its bankllm-build.sig)."""
    from ..signing import build_manifest, key_id, load_private_key, sign_build

    private = load_private_key(key)
    path = sign_build(build_dir, private)
    n = len(build_manifest(build_dir)["files"])
    click.echo(f"signed {n} files of {build_dir} with key {key_id(private.public_key())} -> {path}")


@sign.command("verify")
@click.argument("build_dir", type=PATH)
@click.option("--trust", required=True, type=PATH, help="The public key the signature must verify with.")
def verify(build_dir, trust):
    """Check a build directory against its signature (what `bankllm serve` does at start with trust_key)."""
    from ..signing import key_id, load_public_key, verify_build

    public = load_public_key(trust)
    manifest = verify_build(build_dir, public)
    click.echo(f"verified: {len(manifest['files'])} files of {build_dir} signed by key {key_id(public)}")


def register(cli: click.Group) -> None:
    cli.add_command(sign)
