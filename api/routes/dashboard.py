"""`GET /`: the fleet dashboard, a page of plain ES modules served from the package (no CDN, no build step).

Its files are package data under `api/static/`, served at `/ui/`. The page holds no secret: it signs in through
`/api/v1/session` and from then on its requests carry only the HttpOnly session cookie (`api.sessions`).
"""

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

STATIC = Path(str(files("api") / "static"))

# Only this origin's own files run, nothing may frame the page, and it sends no referrer: a script injected
# through a model id could not load code from elsewhere or send what it read there.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


class _StaticFiles(StaticFiles):
    """The dashboard's files, revalidated on every load so that an upgrade is never half-applied from cache."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update({"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui", _StaticFiles(directory=STATIC), name="ui")
