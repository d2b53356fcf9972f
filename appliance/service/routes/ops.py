"""Operations routes: /health (no key), /ready, /metrics."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency
from litestar.response import Response

from ..errors import APIError
from ..metrics import CONTENT_TYPE_LATEST
from ..service import Service


@get("/health", summary="Process alive (no key needed)")
async def health() -> dict:
    return {"status": "ok"}


@get("/ready", summary="Model loaded and answering")
async def ready(svc: NamedDependency[Service]) -> dict:
    if not svc.ready:
        raise APIError("the model is not loaded yet; retry shortly", status=503)
    return {"status": "ready", "model": svc.settings.model_name, "slots": svc.engine.n_slots,
            "context_per_request": svc.engine.seq_ctx, "labels": len(svc.labels)}


@get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics(svc: NamedDependency[Service]) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [health, ready, metrics]
