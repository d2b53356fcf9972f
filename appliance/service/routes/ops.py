"""Operations routes: /health (no key), /ready and /metrics (any key, health keys included); admin routes (admin
scope): /admin/reload."""

from __future__ import annotations

from litestar import delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.response import Response

from ..auth import HEALTH, OPEN
from ..errors import APIError
from ..metrics import CONTENT_TYPE_LATEST
from ..schemas import AddAdapterRequest
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
            "context_per_request": svc.engine.seq_ctx, "labels": len(svc.labels), "models": list(svc.models)}


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


@get("/admin/adapters", summary="The served base and adapters with their gate figures (admin scope)")
async def admin_adapters(svc: NamedDependency[Service]) -> dict:
    return svc.adapters_info()


@post("/admin/adapters", status_code=201, summary="Add an adapter hot from a directory on the server (admin scope)")
async def admin_add_adapter(data: JSONBody[AddAdapterRequest], svc: NamedDependency[Service]) -> dict:
    return {"status": "added", "adapter": await svc.add_adapter(data.name, data.path, data.sha256)}


@delete("/admin/adapters/{name:str}", status_code=200, summary="Stop serving an adapter; requests in flight finish "
        "(admin scope)")
async def admin_remove_adapter(name: FromPath[str], svc: NamedDependency[Service]) -> dict:
    return {"status": "removed", **await svc.remove_adapter(name)}


ROUTES = [*scoped(OPEN, health), *scoped(HEALTH, ready, metrics),
          *scoped("admin", admin_reload, admin_adapters, admin_add_adapter, admin_remove_adapter)]
