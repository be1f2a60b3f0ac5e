"""The web chat page at `/` of `aviary serve`: plain HTML, JavaScript and CSS shipped in the package
(aviary/serve/static), no build step and nothing fetched from anywhere but this server, so it works offline.
The page talks to the server's own API (/v1/models, /v1/chat/completions with "stream": true) and keeps its
conversations and settings in the browser (docs/serving.md, "Web chat page").

The files are read once, when the app is made, into a fixed table of names: a request names one of them or
gets a 404, so no path can lead out of the folder and no folder is ever listed.
"""

from __future__ import annotations

from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["routes"]

MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

# The page may load and call only this server: a model's reply cannot bring in a script, style or image from
# elsewhere even if it got into the page as markup (the page sets it as text only).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new version of the package shows at the next load
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, media type)} of the page's files."""
    folder = resources.files("aviary.serve") / "static"
    files = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in MEDIA_TYPES:
            files[item.name] = (item.read_bytes(), MEDIA_TYPES[suffix])
    if "index.html" not in files:
        raise FileNotFoundError(f"the web chat page is missing from {folder} (a broken install?)")
    return files


def routes() -> list[Route]:
    """GET / (the page) and GET /static/NAME (its files)."""
    files = static_files()

    def respond(name: str) -> Response:
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    async def page(request: Request) -> Response:
        return respond("index.html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:
            raise HTTPException(404)
        return respond(name)

    return [Route("/", page, methods=["GET"]), Route("/static/{name:path}", static, methods=["GET"])]
