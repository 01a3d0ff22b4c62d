"""GET /plasticity/ui: the page that shows concept scores on the text, steers with sliders and teaches facts.

Runs in the API server process. The page is three static files shipped in the package (ui/index.html,
ui/app.js, ui/style.css: no build step, no CDN, works offline) and talks only to the public routes, with
the API key the user types into it once (kept in the browser's localStorage). The files hold no data, so
they are served without the key; every request the page makes carries it, and is refused without it.
The page exists when readout is on (`--vectors-dir`) unless PLASTICITY_UI=0 (`plasticity serve --no-ui`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

UI_DIR = Path(__file__).with_name("ui")
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # the only files served besides the page


def _require_ui(request: Request) -> None:
    state = getattr(request.app.state, "plasticity", None)
    if state is None:
        raise HTTPException(503, "plasticity is not initialised yet")
    if not state.config.features()["ui"]:
        reason = ("start the server with --vectors-dir DIR" if state.config.vectors_dir is None
                  else "it was turned off with --no-ui (PLASTICITY_UI=0)")
        raise HTTPException(403, f"the plasticity page is off on this server: {reason}")


def attach_ui_routes(router: APIRouter) -> None:
    @router.get("/plasticity/ui", include_in_schema=False)
    async def page(request: Request) -> FileResponse:
        _require_ui(request)
        return FileResponse(UI_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                                     "X-Frame-Options": "DENY"})

    @router.get("/plasticity/ui/{asset}", include_in_schema=False)
    async def asset(asset: str, request: Request) -> FileResponse:
        _require_ui(request)
        if asset not in ASSETS:
            raise HTTPException(404, f"no such file {asset!r} (the page has {sorted(ASSETS)})")
        return FileResponse(UI_DIR / asset, media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})


# Only this server's own scripts, styles and routes: nothing is fetched from elsewhere. No page may frame
# this one (frame-ancestors; X-Frame-Options DENY says the same to browsers without CSP 2): a framing site
# could otherwise trick a user into clicking the page's buttons ("teach" trains the model) under a decoy
# (clickjacking); they act with the API key the page keeps.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'")
