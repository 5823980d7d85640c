"""``lipsync serve …``: the job service's commands (docs/SERVING.md).

Every flag has an environment variable (``LIPSYNC_<NAME>``, plus ``DATABASE_URL``); flags win.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

serve_app = typer.Typer(
    name="serve",
    help="The job service: HTTP API, queue workers, API keys (docs/SERVING.md).",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")

DatabaseUrl = Annotated[
    str | None, typer.Option("--database-url", help="PostgreSQL URL (env DATABASE_URL).")
]
StorageUrl = Annotated[
    str | None,
    typer.Option("--storage-url", help="file:///path or s3://bucket/prefix (LIPSYNC_STORAGE_URL)"),
]


def _settings(**overrides):
    from lipsync.serving.settings import ServeSettings

    return ServeSettings.from_env(**overrides)


def _logging(settings) -> None:
    from lipsync.serving.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)


@serve_app.command("api")
def api(
    database_url: DatabaseUrl = None,
    storage_url: StorageUrl = None,
    host: Annotated[str | None, typer.Option(help="Interface (LIPSYNC_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (LIPSYNC_PORT, 8000).")] = None,
) -> None:
    """Serve the HTTP job API (uvicorn)."""
    from lipsync.serving.api import run_api

    settings = _settings(database_url=database_url, storage_url=storage_url, host=host, port=port)
    settings.require_database()
    _logging(settings)
    run_api(settings)


@serve_app.command("worker")
def worker(
    database_url: DatabaseUrl = None,
    storage_url: StorageUrl = None,
    preset: Annotated[str | None, typer.Option("--preset", "-p", help="v1.6, v1.5, tiny.")] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu.")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32.")] = None,
    compile: Annotated[
        str | None,
        typer.Option(
            help="torch.compile (runner engine): none, regional, full, or auto (from matching "
            "precompiled artefacts of lipsync warmup, else eager)."
        ),
    ] = None,
    fp8: Annotated[
        bool | None, typer.Option("--fp8", help="FP8 U-Net linear layers (runner engine, CUDA).")
    ] = None,
    runner: Annotated[
        str | None, typer.Option(help="auto, engine, triton or module:factory.")
    ] = None,
    triton_url: Annotated[str | None, typer.Option(help="Triton server (runner=triton).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus port (default 9100; 0: none).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker name (default host:pid).")] = None,
) -> None:
    """Run jobs from the queue, one at a time, with the model loaded once."""
    from lipsync.serving.worker import run_worker

    settings = _settings(
        database_url=database_url, storage_url=storage_url, preset=preset, device=device,
        dtype=dtype, compile=compile, fp8=fp8, runner=runner, triton_url=triton_url,
        worker_metrics_port=metrics_port, worker_name=name,
    )  # fmt: skip
    settings.require_database()
    _logging(settings)
    run_worker(settings)


@serve_app.command("migrate")
def migrate(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the database schema (the API and workers also do it at start)."""
    from lipsync.serving import db

    applied = db.migrate(_settings(database_url=database_url).require_database())
    typer.echo(f"schema up to date (applied now: {applied or 'nothing'})")


@serve_app.command("openapi")
def openapi(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Print (or write) the API's OpenAPI document, e.g. to docs/openapi.json."""
    from lipsync.serving.api import openapi_spec

    text = json.dumps(openapi_spec(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)


@contextlib.contextmanager
def _keys_db(database_url: str | None) -> Iterator[Any]:
    """A connection to the service's database, its schema migrated first (the keys commands)."""
    from lipsync.serving import db

    url = _settings(database_url=database_url).require_database()
    db.migrate(url)
    with db.connect(url) as conn:
        yield conn


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for.")],
    concurrency: Annotated[
        int | None, typer.Option(help="Queued + running jobs at once (default: the service's).")
    ] = None,
    quota: Annotated[
        int | None, typer.Option(help="Jobs per 24 hours (default: the service's).")
    ] = None,
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a key; the secret is printed once and only its hash is stored."""
    from lipsync.serving import auth

    with _keys_db(database_url) as conn:
        secret, key = auth.create_key(conn, name, concurrency, quota)
    if as_json:
        typer.echo(json.dumps({"key": secret, **key.as_dict()}))
        return
    typer.echo(secret)
    typer.echo(
        f"created key {key.id} ({key.name}); store it now: it cannot be shown again", err=True
    )


@keys_app.command("list")
def keys_list(
    database_url: DatabaseUrl = None,
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List keys (id, name, prefix, limits; never the secret)."""
    from lipsync.serving import auth

    with _keys_db(database_url) as conn:
        keys = auth.list_keys(conn, include_revoked=revoked)
    if as_json:
        typer.echo(json.dumps([k.as_dict() for k in keys]))
        return
    for k in keys:
        state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
        typer.echo(
            f"{k.id:>5}  {k.prefix}…  {k.name:20s}  concurrency={k.max_concurrency or '-'}  "
            f"quota={k.quota or '-'}  {state}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="Key id, name or prefix.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke a key at once (its jobs are kept)."""
    from lipsync.errors import ConfigError
    from lipsync.serving import auth

    with _keys_db(database_url) as conn:
        revoked = auth.revoke_key(conn, key)
    if not revoked:
        raise ConfigError(f"no active key matches {key!r}")
    for k in revoked:
        typer.echo(f"revoked key {k.id} ({k.name})")


@serve_app.command("triton")
def triton(
    preset: Annotated[str, typer.Option("--preset", "-p", help="v1.6, v1.5 or tiny.")] = "v1.6",
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda if any).")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32.")] = None,
    dir: Annotated[Path | None, typer.Option("--dir", help="Checkpoint cache folder.")] = None,
    compile: Annotated[
        str,
        typer.Option(
            help="torch.compile: none, regional, full, or auto (from matching precompiled "
            "artefacts of lipsync warmup, else eager)."
        ),
    ] = "none",
    fp8: Annotated[bool, typer.Option("--fp8", help="FP8 U-Net linear layers (CUDA).")] = False,
    address: Annotated[str, typer.Option(help="Interface for all endpoints.")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    instances: Annotated[int, typer.Option(help="Instances of the lipsync model.")] = 1,
    max_batch_size: Annotated[int, typer.Option(help="Chunks per model call (batching).")] = 4,
    queue_delay_us: Annotated[
        int, typer.Option(help="How long a chunk may wait for batch-mates (µs).")
    ] = 10_000,
    audio_instances: Annotated[int, typer.Option(help="Instances of audio_features.")] = 1,
    cpu_threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    log_verbose: Annotated[int, typer.Option(help="Triton's verbose log level.")] = 0,
    random_weights: Annotated[
        bool,
        typer.Option("--random-weights", help="Seeded random weights, no checkpoints (timing)."),
    ] = False,
) -> None:
    """Serve the model on Triton Inference Server (PyTriton): audio_features + lipsync
    (docs/TRITON.md). Shared memory needs LIPSYNC_TRITON_ACCESS_TOKEN on both sides."""
    from lipsync.config import LoadOptions
    from lipsync.serving.triton.server import ServerOptions, serve

    load = LoadOptions(
        preset=preset, device=device, dtype=dtype, checkpoint_dir=dir, cpu_threads=cpu_threads,
        compile=compile, fp8=fp8, random_weights=random_weights,
    )  # fmt: skip
    options = ServerOptions(
        load=load, address=address, http_port=http_port, grpc_port=grpc_port,
        metrics_port=metrics_port, instances=instances, max_batch_size=max_batch_size,
        queue_delay_us=queue_delay_us, audio_instances=audio_instances, log_verbose=log_verbose,
    )  # fmt: skip
    serve(options)
