"""The console over HTTP: server-rendered pages and the same as JSON, under /console/.

Served by the health server's thread (health.py) beside the probes; every look and action runs
on the service's own loop (`ServiceLoop`), where the store, the producer and the dispatcher
live. Access, in this order:
- no CONSOLE_USERS: 404 for everything (the console is never open without a login);
- HTTP Basic, else 401;
- a POST must carry `X-Console-Action: 1` (a cross-site form cannot set it), else 403; and
  only operators act (403 for a viewer, checked again in `Console`); a viewer's attempt is
  in the audit, with what it tried on what.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from voucher_bridge.console.access import Operator, Users
from voucher_bridge.console.operations import Console, ConsoleError, viewer_refusal
from voucher_bridge.health import ServiceNotRunning, on_loop

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_templates = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters["pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False)

_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
}
_ACTION_HEADER = "x-console-action"

RunOnService = Callable[[Awaitable[Any], float], Awaitable[Any]]


def console_app(console: Console | None, users: Users, run: RunOnService) -> ASGIApp:
    """The /console/ application; `run(work, timeout_s)` runs work on the service's loop."""
    pages = _Pages(console, run)
    routes = [
        Route("/", pages.overview),
        Route("/dead-letters", pages.dead_letters),
        Route("/dead-letters/{topic}/{partition:int}/{offset:int}", pages.dead_letter),
        Route("/unsettled", pages.unsettled),
        Route("/commands", pages.commands),
        Route("/audit", pages.audit),
        Route("/api/overview", pages.api_overview),
        Route("/api/dead-letters", pages.api_dead_letters),
        Route("/api/dead-letters/record", pages.api_dead_letter),
        Route("/api/dead-letters/replay", pages.api_replay, methods=["POST"]),
        Route("/api/unsettled", pages.api_unsettled),
        Route("/api/unsettled/recheck", pages.api_recheck, methods=["POST"]),
        Route("/api/unsettled/resolve", pages.api_resolve, methods=["POST"]),
        Route("/api/commands", pages.api_commands),
        Route("/api/audit", pages.api_audit),
        Mount("/static", app=StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    return _Guarded(app, users, console, run)


class _Guarded:
    """The access rules above, before any route (ASGI middleware)."""

    def __init__(
        self, app: Starlette, users: Users, console: Console | None, run: RunOnService
    ) -> None:
        self._app = app
        self._users = users
        self._console = console
        self._run = run
        self._enabled = console is not None and users.any

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_secured(message: Any) -> None:
            # Every answer, refusals included, carries the security headers.
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        request = Request(scope, receive)
        refusal = await self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send_secured)
            return
        await self._app(scope, receive, send_secured)

    async def _refusal(self, request: Request) -> Response | None:
        """The answer that refuses the request, or None (the operator then in its state)."""
        if not self._enabled:
            return _plain(404, "Not Found")
        who = self._users.check(request.headers.get("authorization"))
        if who is None:
            response = _plain(401, "a console login is needed")
            response.headers["WWW-Authenticate"] = 'Basic realm="voucher-bridge console"'
            return response
        if request.method not in ("GET", "HEAD"):
            if request.headers.get(_ACTION_HEADER) != "1":
                return _json_error(403, "an action must carry the header X-Console-Action: 1")
            if not who.may_act:
                why = viewer_refusal(who)
                await self._audit_refusal(request, who, why)
                return _json_error(403, why)
        request.scope.setdefault("state", {})["operator"] = who
        return None

    async def _audit_refusal(self, request: Request, who: Operator, why: str) -> None:
        # The request goes no further, so its body is read here for what it tried on what.
        body = await _body(request) or {}
        path = request.url.path
        if path.endswith("/dead-letters/replay"):
            action = "replay_dry_run" if body.get("dry_run") else "replay"
            target = f"{body.get('topic')}/{body.get('partition')}/{body.get('offset')}"
        elif "/unsettled/" in path:  # recheck, resolve
            action, target = path.rsplit("/", 1)[-1], f"{body.get('source')}/{body.get('id')}"
        else:
            action, target = f"{request.method} {path}", ""
        assert self._console is not None  # enabled
        try:
            refused = self._console.refused(who, action[:200], target[:300], why)
            await self._run(refused, 5.0)
        except Exception as exc:  # the refusal stands whether or not the audit took it
            log.warning("a viewer's refused %s was not audited: %s", action, type(exc).__name__)


class _Pages:
    def __init__(self, console: Console | None, run: RunOnService) -> None:
        self._console = console
        self._run = run

    async def _call(self, work: Awaitable[Any], timeout_s: float = 15.0) -> Any:
        return await self._run(work, timeout_s)

    @property
    def console(self) -> Console:
        assert self._console is not None
        return self._console

    # -- pages ------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        return await self._page(request, "overview.html", lambda: self.console.overview())

    async def dead_letters(self, request: Request) -> Response:
        q = request.query_params
        topic = q.get("topic") or self.console.dead_letter_topics[0]

        async def load() -> dict[str, Any]:
            items = await self.console.dead_letters(
                topic, q.get("reason") or None, q.get("key") or None, since_time(q.get("since"))
            )
            return {"items": items}

        return await self._page(
            request,
            "dead_letters.html",
            load,
            topic=topic,
            topics=self.console.dead_letter_topics,
            reason=q.get("reason", ""),
            key=q.get("key", ""),
            since=q.get("since", ""),
        )

    async def dead_letter(self, request: Request) -> Response:
        p = request.path_params
        return await self._page(
            request,
            "dead_letter.html",
            lambda: self.console.dead_letter(p["topic"], p["partition"], p["offset"]),
        )

    async def unsettled(self, request: Request) -> Response:
        async def load() -> dict[str, Any]:
            return {"items": await self.console.unsettled()}

        return await self._page(request, "unsettled.html", load)

    async def commands(self, request: Request) -> Response:
        q = request.query_params
        source, id, subject = q.get("source", ""), q.get("id", ""), q.get("subject", "")

        async def load() -> dict[str, Any]:
            if source and id:
                return {"items": [await self.console.command(source, id)]}
            if subject:
                return {"items": await self.console.commands_of(subject)}
            return {"items": None}

        return await self._page(
            request, "commands.html", load, source=source, id=id, subject=subject
        )

    async def audit(self, request: Request) -> Response:
        async def load() -> dict[str, Any]:
            return {"items": await self.console.audit()}

        return await self._page(request, "audit.html", load)

    async def _page(
        self,
        request: Request,
        template: str,
        load: Callable[[], Awaitable[Any]],
        **context: Any,
    ) -> Response:
        who: Operator = request.state.operator
        status = 200
        try:
            data = await self._call(load())
            error = None
        except ConsoleError as exc:
            data, error, status = None, exc.message, exc.status
        except Exception as exc:  # the broker or the store away: say so on the page
            log.warning("console page %s: %s: %s", request.url.path, type(exc).__name__, exc)
            data, error, status = None, _unavailable(exc), 503
        html = _templates.get_template(template).render(
            data=data,
            error=error,
            who=who,
            page=template.removesuffix(".html"),
            base="/console",
            **context,
        )
        return HTMLResponse(html, status_code=status)

    # -- JSON ---------------------------------------------------------------------------------

    async def api_overview(self, request: Request) -> Response:
        return await self._api(lambda: self.console.overview())

    async def api_dead_letters(self, request: Request) -> Response:
        q = request.query_params
        topic = q.get("topic")
        if not topic:
            return _json_error(422, "topic is required")
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            limit = 0
        if limit < 1:
            return _json_error(422, "limit must be a whole number, 1 or more")

        async def load() -> Any:
            items = await self.console.dead_letters(
                topic,
                q.get("reason") or None,
                q.get("key") or None,
                since_time(q.get("since")),
                limit,
            )
            return {"topic": topic, "items": items}

        return await self._api(load)

    async def api_dead_letter(self, request: Request) -> Response:
        q = request.query_params
        try:
            topic, partition, offset = q["topic"], int(q["partition"]), int(q["offset"])
        except (KeyError, ValueError):
            return _json_error(422, "topic, partition and offset are required")
        return await self._api(lambda: self.console.dead_letter(topic, partition, offset))

    async def api_replay(self, request: Request) -> Response:
        body = await _body(request)
        if body is None:
            return _json_error(422, "a JSON object is expected")
        try:
            topic = str(body["topic"])
            partition, offset = int(body["partition"]), int(body["offset"])
        except (KeyError, ValueError, TypeError):
            return _json_error(422, "topic, partition and offset are required")
        dry_run = bool(body.get("dry_run", False))
        who = request.state.operator
        return await self._api(
            lambda: self.console.replay(who, topic, partition, offset, dry_run), timeout_s=60
        )

    async def api_unsettled(self, request: Request) -> Response:
        async def load() -> Any:
            return {"items": await self.console.unsettled()}

        return await self._api(load)

    async def api_recheck(self, request: Request) -> Response:
        body = await _body(request)
        if body is None or not body.get("source") or not body.get("id"):
            return _json_error(422, "source and id are required")
        who = request.state.operator
        return await self._api(
            lambda: self.console.recheck(who, str(body["source"]), str(body["id"]))
        )

    async def api_resolve(self, request: Request) -> Response:
        body = await _body(request)
        if body is None or not body.get("source") or not body.get("id"):
            return _json_error(422, "source, id, outcome and note are required")
        who = request.state.operator
        return await self._api(
            lambda: self.console.resolve(
                who,
                str(body["source"]),
                str(body["id"]),
                str(body.get("outcome", "")),
                str(body.get("note", "")),
            ),
            timeout_s=60,
        )

    async def api_commands(self, request: Request) -> Response:
        q = request.query_params
        if q.get("source") and q.get("id"):
            return await self._api(lambda: self.console.command(q["source"], q["id"]))
        if q.get("subject"):

            async def load() -> Any:
                return {"items": await self.console.commands_of(q["subject"])}

            return await self._api(load)
        return _json_error(422, "source and id, or subject, are required")

    async def api_audit(self, request: Request) -> Response:
        async def load() -> Any:
            return {"items": await self.console.audit()}

        return await self._api(load)

    async def _api(self, load: Callable[[], Awaitable[Any]], timeout_s: float = 15.0) -> Response:
        try:
            return JSONResponse(await self._call(load(), timeout_s))
        except ConsoleError as exc:
            return _json_error(exc.status, exc.message)
        except Exception as exc:
            log.warning("console API: %s: %s", type(exc).__name__, exc)
            return _json_error(503, _unavailable(exc))


async def _body(request: Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def since_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConsoleError(422, f"since: not an ISO 8601 time: {text!r}") from None


def _unavailable(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "the service did not answer in time (the broker or the store may be away)"
    return f"could not be done now ({type(exc).__name__}); the broker or the store may be away"


def _plain(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain")


def _json_error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


class ServiceLoop:
    """Runs work on the service's loop from the HTTP thread; raises when it cannot."""

    def __init__(self, loop: Callable[[], asyncio.AbstractEventLoop | None]) -> None:
        self._loop = loop

    async def __call__(self, work: Awaitable[Any], timeout_s: float) -> Any:
        try:
            return await on_loop(self._loop(), work, timeout_s)
        except ServiceNotRunning as exc:
            raise ConsoleError(503, str(exc)) from None
