"""TwiML documents → verbs, and the decisions of the interpreter that need no I/O.

`SimCall` (call.py) fetches documents and runs their verbs; what a verb means (where a
`<Redirect>` or `<Connect action>` goes, how long a `<Pause>` is, which URL a `<Stream>` connects
to and what Twilio warns about on the way) is decided here.

Docs: docs/protocols.md, section "Twilio Media Streams", "TwiML and webhooks".
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from .wire import ERR_DOCUMENT_PARSE, ERR_HANDSHAKE, ERR_SCHEME, ERR_TRACK, resolve_url


class TwimlError(ValueError):
    """The document (or one of its verbs) is not TwiML Twilio would execute; the message starts
    with Twilio's error code."""


@dataclass
class Verb:
    tag: str
    attrs: dict[str, str]
    text: str
    children: list[Verb] = field(default_factory=list)

    def child(self, tag: str) -> Verb | None:
        for c in self.children:
            if c.tag == tag:
                return c
        return None


def _to_verb(el: ET.Element) -> Verb:
    return Verb(
        tag=el.tag,
        attrs={k: v for k, v in el.attrib.items()},
        text=(el.text or "").strip(),
        children=[_to_verb(c) for c in el],
    )


def parse_twiml(doc: str | bytes) -> list[Verb]:
    """Parse a TwiML document into its top-level verbs (children of <Response>)."""
    try:
        root = ET.fromstring(doc)
    except ET.ParseError as exc:
        raise TwimlError(f"{ERR_DOCUMENT_PARSE} document parse failure: {exc}") from exc
    if root.tag != "Response":
        raise TwimlError(f"{ERR_DOCUMENT_PARSE} root element is <{root.tag}>, not <Response>")
    return [_to_verb(c) for c in root]


def dial_target(verb: Verb) -> str:
    """What a <Dial> dials: a nested <Number>/<Sip>/<Client>/<Conference>/<Queue>, or its text."""
    for tag in ("Number", "Sip", "Client", "Conference", "Queue", "Application"):
        c = verb.child(tag)
        if c is not None:
            return c.text
    return verb.text


def pause_length(verb: Verb) -> float:
    """Seconds a <Pause> asks for: its `length` (default 1; unreadable → 1)."""
    try:
        length = float(verb.attrs.get("length", "1"))
    except ValueError:
        length = 1.0
    return length


def method_of(verb: Verb) -> str:
    """HTTP method of a verb's request (`method` attribute, POST by default)."""
    return verb.attrs.get("method", "POST").upper()


def action_url(verb: Verb, base: str) -> str | None:
    """Where `<Connect action>` goes once its stream has ended (None: continue the document)."""
    action = verb.attrs.get("action")
    return resolve_url(action, base) if action else None


def stream_parameters(stream: Verb) -> dict[str, str]:
    """`<Parameter name value>` children of a `<Stream>`: the `start` message's customParameters."""
    return {
        p.attrs.get("name", ""): p.attrs.get("value", "")
        for p in stream.children
        if p.tag == "Parameter"
    }


def status_callback(stream: Verb, base: str) -> tuple[str, str] | None:
    """(url, method) of a `<Stream statusCallback>`, if it has one."""
    cb = stream.attrs.get("statusCallback")
    if not cb:
        return None
    return resolve_url(cb, base), stream.attrs.get("statusCallbackMethod", "POST").upper()


@dataclass(frozen=True)
class StreamUrl:
    """Where a `<Stream>` connects, as Twilio signs it."""

    url: str
    warnings: tuple[tuple[str, str], ...]  # (code, detail) Twilio would log, in order
    hint: str  # appended to a handshake error: why the gateway may have refused it


def stream_url(stream: Verb, base: str) -> StreamUrl:
    """Resolve a `<Stream url>` like Twilio: relative to the document, https→wss, `ws://`
    accepted with a warning (local setups; real Twilio refuses it), query string and fragment
    dropped ("The url does not support query string parameters") and the handshake signed
    without them. Raises TwimlError (31920 no url, 31922 wrong scheme)."""
    raw = stream.attrs.get("url", "")
    if not raw.strip():
        raise TwimlError(f"{ERR_HANDSHAKE} <Stream> without url")
    url = resolve_url(raw, base)
    parts = urlsplit(url)
    if parts.scheme == "https":  # a relative url resolves against the https webhook
        parts = parts._replace(scheme="wss")
    if parts.scheme not in ("wss", "ws"):
        raise TwimlError(f"{ERR_SCHEME} stream url scheme must be wss: {url!r}")
    warnings: list[tuple[str, str]] = []
    if parts.scheme == "ws":
        warnings.append((ERR_SCHEME, f"ws:// stream url {url!r}"))
    hint = ""
    if parts.query or parts.fragment:
        warnings.append(("stream-url-query-dropped", url))
        hint = " (the <Stream url> query string was dropped, as Twilio does)"
    return StreamUrl(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), tuple(warnings), hint)


def check_track(stream: Verb) -> None:
    """`<Connect><Stream>` is inbound-only: any other `track` is error 31941."""
    track = stream.attrs.get("track")
    if track not in (None, "inbound_track"):
        raise TwimlError(f"{ERR_TRACK} invalid track {track!r} for <Connect>")
