"""The labeling web app: one page for labelers and admins, and the JSON API it (and the simulator) use.

    GET  /                                  the page (token in the link's #fragment, never in the URL path)
    GET  /api/me                            who the token belongs to, their batches and progress
    GET  /api/batches/{batch}/next          the next item (responses in a recorded random order)
    POST /api/submissions                   {item_id, idempotency_key, ranking | ab, demonstration?, replace?}
    GET  /api/admin/batches                 batches with counts                  (admin token)
    POST /api/admin/batches                 create a batch from JSON               (admin token)
    POST /api/admin/labelers                invite a labeler: returns the token     (admin token)
    GET  /api/admin/batches/{batch}/export  every submission                        (admin token)
    GET  /api/admin/batches/{batch}/report  leaderboard, agreement, labeler quality (admin token)

A missing or unknown token gets 401, a labeler on an admin route 403, a bad
ranking 400 with the reason, a second submission of an item 409 unless it
asks to replace. Responses are JSON; the page renders every text with
``textContent`` (never as HTML).
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from .page import PAGE
from .report import batch_report, json_safe as _clean
from .store import Labeler, LabelStore, StoreError

__all__ = ["create_app"]

MAX_BODY = 1_000_000


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(store: LabelStore, *, report_rounds: int = 1000) -> FastAPI:
    app = FastAPI(title="alignflow labeling", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StoreError)
    async def _store_error(_req: Request, exc: StoreError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(_HTTPError)
    async def _http_error(_req: Request, exc: _HTTPError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.middleware("http")
    async def _headers(request: Request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
        return response

    def who(request: Request, *, admin: bool = False) -> Labeler:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        labeler = store.authenticate(token)
        if labeler is None:
            raise _HTTPError(401, "missing or unknown token: open your personal link")
        if admin and not labeler.is_admin:
            raise _HTTPError(403, "this needs the admin token")
        return labeler

    async def body(request: Request) -> dict:
        too_big = _HTTPError(413, f"request body over {MAX_BODY} bytes")
        if not (request.headers.get("content-length") or "0").isdigit():
            raise _HTTPError(400, "bad Content-Length")
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            raise too_big
        parts, size = [], 0
        async for chunk in request.stream():  # read no more than the cap, whatever the header said
            size += len(chunk)
            if size > MAX_BODY:
                raise too_big
            parts.append(chunk)
        raw = b"".join(parts)
        try:
            data = json.loads(raw or b"{}")
        except ValueError as exc:
            raise _HTTPError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _HTTPError(400, "request body must be a JSON object")
        return data

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/api/me")
    def me(request: Request) -> JSONResponse:
        labeler = who(request)
        out = []
        for bid in store.batch_ids():
            b = store.batch(bid)
            out.append({"id": bid, "name": b["name"], "progress": store.progress(bid, labeler)})
        return JSONResponse({"name": labeler.name, "is_admin": labeler.is_admin, "batches": out})

    @app.get("/api/batches/{batch_id}/next")
    def next_item(batch_id: str, request: Request) -> JSONResponse:
        labeler = who(request)
        item = store.next_item(batch_id, labeler)
        if item is None:
            return JSONResponse({"done": True, "progress": store.progress(batch_id, labeler)})
        return JSONResponse(item)

    @app.post("/api/submissions")
    async def submit(request: Request) -> JSONResponse:
        labeler = who(request)
        data = await body(request)
        item_id = data.get("item_id")
        if not isinstance(item_id, str):
            raise _HTTPError(400, "item_id (a string) is required")
        ab = data.get("ab")
        demonstration = data.get("demonstration")
        if demonstration is not None and not isinstance(demonstration, str):
            raise _HTTPError(400, "demonstration must be a string")
        out = await run_in_threadpool(
            store.submit, item_id, labeler, idempotency_key=str(data.get("idempotency_key") or ""),
            ranking=data.get("ranking"), ab=ab, demonstration=demonstration, replace=bool(data.get("replace")))
        return JSONResponse(out, status_code=200 if out["duplicate"] else 201)

    @app.get("/api/admin/batches")
    def admin_batches(request: Request) -> JSONResponse:
        who(request, admin=True)
        return JSONResponse([{**store.batch(b), **store.counts(b)} for b in store.batch_ids()])

    @app.post("/api/admin/batches")
    async def admin_create(request: Request) -> JSONResponse:
        who(request, admin=True)
        data = await body(request)
        try:
            n = store.create_batch(str(data["id"]), str(data.get("name") or data["id"]), data["items"],
                                   instructions=str(data.get("instructions") or ""),
                                   overlap=int(data.get("overlap", 3)),
                                   demonstrations=bool(data.get("demonstrations")),
                                   provenance=data.get("provenance") or {})
        except (KeyError, TypeError) as exc:
            raise _HTTPError(400, f"batch needs id and items (each item_id, prompt_id, prompt, responses): {exc}") \
                from exc
        return JSONResponse({"id": data["id"], "items": n}, status_code=201)

    @app.post("/api/admin/labelers")
    async def admin_invite(request: Request) -> JSONResponse:
        who(request, admin=True)
        data = await body(request)
        token = store.invite(str(data.get("name") or ""))
        return JSONResponse({"name": data.get("name"), "token": token}, status_code=201)

    @app.get("/api/admin/batches/{batch_id}/export")
    def admin_export(batch_id: str, request: Request) -> JSONResponse:
        who(request, admin=True)
        return JSONResponse(_clean(store.export(batch_id)))

    @app.get("/api/admin/batches/{batch_id}/report")
    def admin_report(batch_id: str, request: Request) -> JSONResponse:
        who(request, admin=True)
        rows = store.export(batch_id)
        return JSONResponse(_clean({"batch": store.batch(batch_id), "counts": store.counts(batch_id),
                                    **batch_report(rows, rounds=report_rounds)}))

    return app
