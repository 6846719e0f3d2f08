"""`nats`: publish on the server's NATS connection, and request (new) to call other scripts.

nats.publish(subject, payload) -> true, nil | false, err
nats.request(subject, payload [, timeout_seconds]) -> reply, nil | nil, err
A payload that is not a string is converted as gopher-lua's tostring would for a number, and
is empty for every other value (tables, booleans, nil).
"""

from __future__ import annotations

from msgscript import error_text, lua_text, opt_number, valid_subject


def _loader(ctx):
    def bridge():
        if ctx.services.nats is None:
            raise ConnectionError("Not connected to NATS")
        return ctx.services.nats

    def publish(subject=None, payload=None):
        subject = lua_text(subject)
        if not valid_subject(subject):
            return False, _bad_subject("publish", subject)
        try:
            bridge().publish(subject, lua_text(payload).encode("utf-8", "surrogateescape"), ctx.remaining(5),
                             ctx.trace_headers())
            return True, None
        except Exception as e:  # noqa: BLE001 - Lua gets false, err
            return False, error_text(e)

    def request(subject=None, payload=None, timeout=None):
        subject = lua_text(subject)
        if not valid_subject(subject):
            return None, _bad_subject("request", subject)
        timeout = opt_number(timeout, 3, 5) or 5
        try:
            msg = bridge().request(subject, lua_text(payload).encode("utf-8", "surrogateescape"),
                                   ctx.remaining(float(timeout)), ctx.trace_headers())
        except Exception as e:  # noqa: BLE001 - Lua gets nil, err
            return None, error_text(e)
        if msg.headers and "Nats-Service-Error" in msg.headers:
            return None, f"{msg.headers['Nats-Service-Error']} ({msg.headers.get('Nats-Service-Error-Code', '500')})"
        ctx.fits(len(msg.data), "NATS reply")
        return msg.data, None

    return {"publish": publish, "request": request}


def _bad_subject(name: str, subject: str) -> str:
    return f"nats.{name}: invalid subject {subject[:80]!r}" if subject else f"nats.{name} needs a subject"


def lua_modules():
    return {"nats": _loader}
