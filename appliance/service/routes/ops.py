"""Operations routes: /health (no key), /ready and /metrics (any key, health keys included); admin routes (admin
scope): /admin/reload."""

from __future__ import annotations

from litestar import get, post
from litestar.di import NamedDependency
from litestar.response import Response

from ..auth import HEALTH, OPEN
from ..errors import APIError
from ..metrics import CONTENT_TYPE_LATEST
from ..service import Service
from . import scoped


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


@post("/admin/reload", status_code=200, summary="Re-read the API keys and the answer library (admin scope)")
async def admin_reload(svc: NamedDependency[Service]) -> dict:
    result = svc.reload()
    if not result["keys"]["reloaded"]:
        raise APIError(f"the key file was refused and the previous keys stay in force: {result['keys']['error']}",
                       status=409, code="keys_not_reloaded")
    return {"status": "reloaded", **result}


ROUTES = [*scoped(OPEN, health), *scoped(HEALTH, ready, metrics), *scoped("admin", admin_reload)]
