"""The console page in a real browser (headless Chromium driven by Playwright) against a real
gateway and worker with both stand-ins: a call shows up live, its transcript streams in, the
page steers it (hang up, say, transfer) and listens in; a wrong key shows an error and no data;
`callbridge demo --console` serves the page and places calls until SIGINT.

Skipped only when there is no Chromium executable or the playwright package is missing.
`CONSOLE_SCREENSHOT=docs/console.png pytest tests/test_console_browser.py` refreshes the README's
screenshot (every run saves one under pytest's temporary directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from callbridge.redis_server import free_port
from sim.vapi import VapiSession, greeter
from tests.conftest import ROOT, Proc
from tests.test_e2e import Stack, caller_utterance, make_stack, until, wait_heard

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.exists(p)), None)
if CHROMIUM is None:
    pytest.skip("no Chromium executable (/usr/bin/chromium, chromium or chromium-browser on PATH)",
                allow_module_level=True)
pw = pytest.importorskip("playwright.async_api",
                         reason="the playwright package is not installed (pip install -e '.[test]')")

KEY = "console-test-key-0123456789"
ENV = {"API_KEYS": f"other-key,{KEY}", "TRANSFER_ALLOW": "+1555987*",
       "ASSISTANT_ROUTES": '{"+15550002222": "asst-reception"}'}
T = 10_000  # ms: the longest any one page condition may take (they take well under a second)


@pytest.fixture(scope="module")
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    """One gateway + worker + stand-ins for the whole module (each test places its own calls)."""
    procs: list[Proc] = []
    client = aioredis.Redis.from_url(redis_url)
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    try:
        async for s in make_stack(redis_url, prefix, procs, client, assistant=greeter(answers=5), **ENV):
            yield s
    finally:
        for p in procs:
            p.stop()
        await client.aclose()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async with pw.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        yield b
        await b.close()


class Page:
    """A fresh browser tab (its own sessionStorage) on the console, collecting script errors."""

    def __init__(self, page: Any, base: str) -> None:
        self.page, self.base = page, base
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    async def open(self, hash_: str = "") -> None:
        await self.page.goto(f"{self.base}/console{hash_}")

    async def sign_in(self, key: str = KEY) -> None:
        await self.page.fill("#key", key)
        await self.page.click("#login-go")

    def row(self, sid: str) -> Any:
        return self.page.locator(f'#live-body tr[data-sid="{sid}"]')


@pytest.fixture
async def tab(browser: Any, stack: Stack) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1440, "height": 960})
    page = Page(await context.new_page(), stack.gateway.env["PUBLIC_URL"])
    yield page
    await context.close()
    assert not page.errors, f"script errors on the page: {page.errors}"


def expect(locator: Any) -> Any:
    return pw.expect(locator)


async def session_of(stack: Stack, sid: str) -> VapiSession:
    """The stand-in's session for a call (the module's calls share one VapiSim)."""
    def find() -> VapiSession | None:
        return next((x for x in list(stack.vapi.sessions.values())
                     if x.body["assistantOverrides"]["variableValues"].get("twilioCallSid") == sid),
                    None)
    await until(lambda: find() is not None, 10, f"a Vapi session for {sid}")
    session = find()
    assert session is not None
    return session


async def wait_js(page: Any, expression: str, timeout_ms: int = T) -> None:
    """Until a script expression is true. Polled from here: the page's CSP (no eval) forbids
    the in-page polling of Playwright's wait_for_function."""
    deadline = time.monotonic() + timeout_ms / 1000
    while not await page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        await asyncio.sleep(0.05)


async def test_the_pages_stream_parser_and_mu_law_decoder(tab: Page) -> None:
    """The page's own modules, in the page: server-sent events split at every byte, with each
    line ending the format allows and comments between; G.711 μ-law as audioop decodes it."""
    await tab.open()
    stream = ': keepalive\r\nevent: snapshot\r\ndata: {"calls": []}\r\n\r\n' \
             'event: call\ndata: {"kind": "live",\ndata:  "n": 2}\n\n: keepalive\rdata: 3\r\r'
    splits = await tab.page.evaluate("""async (text) => {
        const { SSEParser } = await import('/console/assets/sse.js');
        const out = [];
        for (let cut = 0; cut <= text.length; cut++) {
            const got = [];
            const p = new SSEParser((name, data) => got.push([name, data]));
            p.push(text.slice(0, cut));
            p.push(text.slice(cut));
            out.push(JSON.stringify(got));
        }
        return out;
    }""", stream)
    want = [["snapshot", '{"calls": []}'], ["call", '{"kind": "live",\n "n": 2}'], ["message", "3"]]
    assert {json.dumps(want, separators=(",", ":"))} == set(splits)
    table = await tab.page.evaluate("""async () => {
        const { ULAW } = await import('/console/assets/listen.js');
        return Array.from(ULAW, (v) => Math.round(v * 32768));
    }""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    assert table == list(struct.unpack("<256h", audioop.ulaw2lin(bytes(range(256)), 2)))


async def test_a_wrong_key_shows_an_error_and_no_data(stack: Stack, tab: Page) -> None:
    call = await stack.call()  # there is something to show: a live call
    await session_of(stack, call.call_sid)
    await tab.open()
    await tab.sign_in("not-the-key")
    await expect(tab.page.locator("#login-error")).to_have_text(re.compile("Wrong API key"), timeout=T)
    await expect(tab.page.locator("#login-error")).to_be_visible()
    await expect(tab.page.locator("#app")).to_be_hidden()
    assert await tab.page.locator("#live-body tr, #recent-body tr").count() == 0
    assert await tab.page.evaluate("sessionStorage.length") == 0

    # The right key shows the call; signing out forgets the key and every row.
    await tab.sign_in()
    await expect(tab.row(call.call_sid)).to_be_visible(timeout=T)
    await expect(tab.page.locator("#conn")).to_have_attribute("data-state", "live")
    await tab.page.click("#signout")
    await expect(tab.page.locator("#login")).to_be_visible()
    assert await tab.page.locator("#live-body tr").count() == 0
    assert await tab.page.evaluate("sessionStorage.length") == 0
    await call.hangup()  # it shows in the next test's "Recent" list


async def test_a_call_shows_live_with_its_transcript_and_hangs_up_from_the_page(
        stack: Stack, tab: Page, tmp_path_factory: pytest.TempPathFactory) -> None:
    page = tab.page
    await tab.open()
    await tab.sign_in()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=T)
    other = await stack.twilio.place_call(from_="+15550004444", to="+15550002222")
    call = await stack.call()
    row = tab.row(call.call_sid)
    await expect(row).to_be_visible(timeout=T)
    await expect(row.locator("td").nth(1)).to_have_text("in")
    await row.click()
    assert page.url.endswith(f"#/calls/{call.call_sid}")
    view = page.locator(f'.call-view[data-sid="{call.call_sid}"]')
    await expect(view).to_be_visible()
    await expect(view.locator(".feed-state")).to_have_text("live", timeout=T)

    # The transcript as it happens: the greeting, then each caller turn and its answer.
    assistant = page.locator('#transcript .line[data-role="assistant"]')
    caller = page.locator('#transcript .line[data-role="user"]')
    await expect(assistant).to_have_count(1, timeout=T)
    await wait_heard(call, 1)
    for turn in range(3):
        call.say_pcm(caller_utterance(turn))
        await expect(caller).to_have_count(turn + 1, timeout=T)
        await expect(assistant).to_have_count(turn + 2, timeout=T)
        await wait_heard(call, turn + 2)
    await expect(caller.last.locator(".text")).to_have_text("utterance 3")
    await expect(page.locator("#latency-chart")).to_have_attribute("data-points", "3", timeout=T)
    await wait_js(page, "+document.querySelector('#health').dataset.samples >= 3")
    assert re.fullmatch(r"\d+", (await row.locator("td").nth(6).text_content()) or "")

    shot = tmp_path_factory.mktemp("console") / "console.png"
    await page.screenshot(path=str(shot))
    print(f"console screenshot: {shot}")
    if target := os.environ.get("CONSOLE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / target)

    # Hang up from the page (two clicks: the first arms the button).
    await page.click("#act-hangup")
    await expect(page.locator("#act-hangup")).to_have_text("Confirm hang up")
    await page.click("#act-hangup")
    await call.wait_ended(5)
    await expect(row).to_have_count(0, timeout=T)
    await expect(view.locator(".pill.ended")).to_be_visible(timeout=T)
    await expect(page.locator("#act-hangup")).to_be_disabled()
    await expect(page.locator(f'#recent-body tr[data-sid="{call.call_sid}"]')).to_be_visible(timeout=T)
    # An ended call stays viewable, from its link.
    await page.reload()
    await expect(page.locator(f'.call-view[data-sid="{call.call_sid}"] .feed-state')).to_have_text(
        "call ended", timeout=T)
    await expect(assistant).to_have_count(4)
    await other.hangup()


async def test_say_transfer_and_listen_in_from_the_page(stack: Stack, tab: Page) -> None:
    page = tab.page
    call = await stack.call()
    session = await session_of(stack, call.call_sid)
    await tab.open(f"#/calls/{call.call_sid}")  # a link to the call: the view opens on sign-in
    await tab.sign_in()
    view = page.locator(f'.call-view[data-sid="{call.call_sid}"]')
    await expect(view.locator(".feed-state")).to_have_text("live", timeout=T)

    # Listen in: both directions' frames arrive (the caller's flow all along, 50 a second).
    await page.click("#listen")
    await expect(page.locator("#listen-state")).to_have_text("listening", timeout=T)
    await wait_js(page, "window.__listenFrames >= 25")
    await page.click("#listen")
    await expect(page.locator("#listen-state")).to_have_text("stopped")

    # Say: the stand-in's session is told to say it, and the call's events and transcript show
    # it, as text: markup in what the API returns is never markup in the page.
    text = 'One moment <img src=x onerror="window.__xss=1"> <b>please</b>.'
    await page.fill("#say-text", text)
    await page.click("#act-say")
    await expect(page.locator("#act-msg")).to_have_text("Say: accepted", timeout=T)
    await until(lambda: any(m.get("content") == text for m in session.received_control("say")),
                5, "Vapi told to say it")
    await expect(page.locator("#events .ev .k", has_text="api-say")).to_have_count(1, timeout=T)
    await expect(page.locator('#transcript .line[data-role="assistant"] .text').last).to_have_text(
        text, timeout=T)
    assert await page.locator("#app img, #app b").count() == 0
    assert await page.evaluate("window.__xss") is None

    # A transfer TRANSFER_ALLOW refuses shows the API's answer; an allowed one ends the call at
    # Twilio with a <Dial>, and a listener open meanwhile is told the call has ended (4409).
    await page.fill("#transfer-to", "+15550001234")
    await page.click("#act-transfer")
    await expect(page.locator("#act-msg")).to_have_text(
        re.compile(r"403: \+15550001234 is not allowed by TRANSFER_ALLOW"), timeout=T)
    await page.click("#listen")
    await expect(page.locator("#listen-state")).to_have_text("listening", timeout=T)
    await page.fill("#transfer-to", "+15559870000")
    await page.click("#act-transfer")
    assert await call.wait_ended(5) == "dial"
    assert call.dial_target == "+15559870000"
    await expect(page.locator("#listen-state")).to_have_text("the call has ended", timeout=T)
    await expect(view.locator(".feed-state")).to_have_text("call ended", timeout=T)
    await expect(page.locator("#act-transfer")).to_be_disabled()


def _start_time(pid: int) -> int | None:
    """A live process's start time (clock ticks after boot), None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _descendants(pid: int) -> set[tuple[int, int | None]]:
    """Every descendant of a process, as (pid, start time): a pid reused later is not it."""
    out: set[tuple[int, int | None]] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                for kid in (int(k) for k in (task / "children").read_text().split()):
                    out.add((kid, _start_time(kid)))
                    todo.append(kid)
    return out


async def test_demo_console_serves_the_page_places_calls_and_stops_on_sigint(browser: Any) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # its own embedded Redis
    proc = subprocess.Popen([sys.executable, "-m", "callbridge.cli", "demo", "--console", "--port",
                             str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 30
        while not any(line.startswith("API key:") for line in lines):
            assert time.monotonic() < deadline, f"no console address printed: {lines}"
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 30)
            assert line, f"demo exited: {lines}"
            lines.append(line.strip())
        url = f"http://127.0.0.1:{port}/console"
        assert f"console:  {url}" in lines and "API key:  demo-api-key" in lines, lines
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(url)
            assert r.status_code == 200 and "callbridge console" in r.text

        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(url)
        await page.fill("#key", "demo-api-key")
        await page.click("#login-go")
        await expect(page.locator("#live-body tr").first).to_be_visible(timeout=15_000)
        await context.close()

        children = _descendants(proc.pid)
        assert children, "the demo runs an embedded Redis"
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(loop.run_in_executor(None, proc.wait), 30)
        rest = proc.stdout.read()
        assert rc == 0, f"exit {rc}: {lines} {rest}"
        assert "stopping" in rest
        left = {pid for pid, started in children if started is not None and _start_time(pid) == started}
        assert not left, f"child processes left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_list_reconnects_when_the_gateway_restarts(stack: Stack, tab: Page) -> None:
    """Runs last of the stack's tests: it restarts the module's gateway."""
    page = tab.page
    await tab.open()
    await tab.sign_in()
    conn = page.locator("#conn")
    await expect(conn).to_have_attribute("data-state", "live", timeout=T)
    # A deploy: SIGTERM drains the gateway, which ends the console's streams at once (so that
    # browsers move to another gateway) rather than holding its exit for them.
    asked = time.monotonic()
    stopped = asyncio.create_task(asyncio.to_thread(stack.gateway.stop))
    await expect(conn).to_have_attribute("data-state", "down", timeout=T)
    assert time.monotonic() - asked < 5, "the console's stream outlived the drain"
    await stopped
    await expect(page.locator("#conn-text")).to_have_text(re.compile("retrying in"))
    stack.gateway.start()
    await stack.gateway.wait_ready()
    call = await stack.call()  # placed while the page may still be waiting to retry
    await expect(conn).to_have_attribute("data-state", "live", timeout=20_000)
    await expect(tab.row(call.call_sid)).to_be_visible(timeout=T)
    await call.hangup()
    await expect(tab.row(call.call_sid)).to_have_count(0, timeout=T)
