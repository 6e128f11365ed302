"""The web page at `/ui`: the jobs with their live progress, a new-job form (a dataset uploaded or chosen, the backbone
and method, the plan of a dry run, then the job submitted), a comparison of several jobs (curves overlaid, figures side
by side), a job's events and training curves, the models, a model's evaluation (report, confusion matrix, plots), its
exports and a predict form, the datasets.

Served by the API from files in the package (api/ui/: Jinja2 templates, plain scripts (`ui.js` shared by every
page, one more for a page that needs more) and one stylesheet; no build step, nothing fetched from elsewhere; a
Content-Security-Policy allows only this origin). The server renders each page's frame (navigation, the ids it shows,
whether the server needs a key); the script fills it from the public API with the caller's key, so the page sees
exactly what that key sees through the API and nothing else: the same owner checks, the same 404s; the new-job form
uploads, plans and submits through the same API with the same key. With API keys configured, the page asks for a key
and keeps it in the browser's sessionStorage (gone when the browser session ends; never in a cookie, so no request
carries it unasked); the API's 401 is shown as a message with the key form, never a blank page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

UI = Path(__file__).resolve().parent.parent / "ui"
templates = Jinja2Templates(directory=UI / "templates")  # autoescapes: ids from the URL go in as text
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(prefix="/ui", include_in_schema=False)


def _page(request: Request, template: str, title: str, **context: str) -> HTMLResponse:
    keys = bool(request.app.state.settings.all_keys)
    page = template.removesuffix(".html")
    response = templates.TemplateResponse(request, template, {"page": page, "title": title, "keys": keys, **context})
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", "Jobs")


@router.get("/jobs/new", response_class=HTMLResponse)  # before /jobs/{job_id}; job ids are `job_...`
def new_job_page(request: Request) -> HTMLResponse:
    return _page(request, "new_job.html", "New job")


@router.get("/compare", response_class=HTMLResponse)  # the jobs are in the query (`?jobs=a,b`), read by the script
def compare_page(request: Request) -> HTMLResponse:
    return _page(request, "compare.html", "Compare jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    return _page(request, "job.html", job_id, job_id=job_id)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request) -> HTMLResponse:
    return _page(request, "models.html", "Models")


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(request: Request, model_id: str) -> HTMLResponse:
    return _page(request, "model.html", model_id, model_id=model_id)


@router.get("/datasets", response_class=HTMLResponse)
def datasets_page(request: Request) -> HTMLResponse:
    return _page(request, "datasets.html", "Datasets")


def install(app: FastAPI) -> None:
    """The pages, their script and stylesheet, and `/` leading to them."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=UI / "static"), name="ui-static")
    app.add_api_route("/", lambda: RedirectResponse("/ui"), include_in_schema=False)
