"""The dashboard's web app: FastAPI serves one page, its script and style, and two JSON endpoints the
page polls (state.py computes what they return). Read-only, no cookies, no forms; every model, data
and run string reaches the page as JSON and is put in with textContent, never as HTML; the
Content-Security-Policy allows the page's own script and style only, so an injected tag would not run
even if one slipped through."""

from pathlib import Path

import jinja2
from fastapi import FastAPI, Request  # (no `from __future__ import annotations`: FastAPI reads the hints)
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from loralab.dashboard.state import Dashboard
from loralab.errors import LoralabError
from loralab.workspace.store import shown

HERE = Path(__file__).parent
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def make_app(root: Path | str, refresh_s: float = 2.0) -> FastAPI:
    dash = Dashboard(root)
    app = FastAPI(title="loralab dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dashboard = dash
    # autoescape for every template: Starlette's default escapes only *.html, and ours is *.html.j2
    templates = Jinja2Templates(env=jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        return templates.TemplateResponse(request, "dashboard.html.j2",
                                          {"workspace": shown(root), "refresh_ms": int(refresh_s * 1000)})

    @app.get("/api/state")
    def state(experiment: str | None = None):
        try:
            return dash.state(experiment)
        except Exception as err:  # the workspace database damaged or away: one line on the page, polled again
            from loralab.workspace.store import storage_error

            known = storage_error(err, root) or (err if isinstance(err, LoralabError) else None)
            if known is None:
                raise
            return JSONResponse({"error": str(known).splitlines()[0]}, status_code=503)

    @app.get("/api/curves")
    def curves(ids: str = ""):
        return dash.curves([i for i in ids.split(",") if i][:20])

    @app.on_event("shutdown")
    def close() -> None:
        dash.close()

    return app
