"""The dashboard's static files (``coordinator/api/ui/``), served from every
node at ``/ui``. They hold no data: the page reads the JSON API with the
visitor's credential, so it shows only what that credential may see."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from coordinator.api.spec import Op
from coordinator.errors import NotFound

ui_routes = web.RouteTableDef()

UI_DIR = Path(__file__).with_name("ui")
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:"}


# Read once, when the module is imported (never on the event loop); a fixed
# list, so no path from a request reaches the file system.
_BODIES = {name: (UI_DIR / name).read_bytes() for name in FILES}


def _file(name: str) -> web.Response:
    if name not in _BODIES:
        raise NotFound(f"no dashboard file {name!r}")
    return web.Response(body=_BODIES[name], content_type=FILES[name], charset="utf-8", headers=HEADERS)


@ui_routes.get("/ui")
@Op("The dashboard page", tags=("dashboard",), content="text/html")
async def index(request: web.Request) -> web.Response:
    return _file("index.html")


@ui_routes.get("/ui/{file}")
@Op("One of the dashboard's static files", tags=("dashboard",), content="*/*")
async def static_file(request: web.Request) -> web.Response:
    return _file(request.match_info["file"])
