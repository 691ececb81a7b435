"""The web console in a real browser: Debian's chromium driven by Playwright for Python (no
browser download), against a real `slimserve serve` over TLS with API keys.

One server and one browser for the module. The page must list the models with their variants
and degrade targets, its live charts must move under load, a chat must stream tokens into the
page, a bad request must show the server's own error, reports must render with their plots,
and a page opened without a key must show nothing but the key prompt (its JSON: 401).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from slimserve.security.keys import KeyStore
from tests.e2e.conftest import ServerProcess, start_server, stop_server
from tests.e2e.console_repo import build_console_repo
from tests.runtimes.llm.conftest import tiny_llama_dir  # noqa: F401 - a fixture
from tests.tls import Pki, make_pki

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        "chromium is not installed (apt-get install chromium); the console's browser tests need it",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

# Generous: the module's first test also builds the tiny LLM and starts the server, which on a
# loaded 2-core machine took up to 3 minutes.
pytestmark = pytest.mark.timeout(420)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 20_000
# SLIMSERVE_SCREENSHOTS=docs/console: each test also saves a picture of the page it checked
# (the README's screenshots come from here).
SCREENSHOTS = os.environ.get("SLIMSERVE_SCREENSHOTS")


class Keys:
    def __init__(self, folder: Path) -> None:
        self.path = folder / "keys.json"
        store = KeyStore(self.path)
        self.admin = store.create("admin", ["infer", "metrics", "manage"])[1]
        self.reader = store.create("reader", ["infer"], models=["mlp"])[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("console-pki"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("console-keys"))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama_dir: Path,  # noqa: F811
    keys: Keys,
    pki: Pki,
) -> Iterator[ServerProcess]:
    root = build_console_repo(tmp_path_factory.mktemp("console") / "models", tiny_llama_dir)
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    context = ssl.create_default_context(cafile=str(pki.ca))
    options = ("--api-keys-file", str(keys.path), "--model-control", *tls)
    with pytest.MonkeyPatch.context() as patch:  # the server imports text_models from here
        patch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)
        proc = start_server(
            root, root.parent / "server.log", *options, ssl_context=context, timeout=240
        )
    yield proc
    stop_server(proc)
    assert proc.process.returncode == 0, f"server did not stop cleanly:\n{proc.log()}"


@pytest.fixture(scope="module")
def base(server: ServerProcess) -> str:
    return f"https://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def http(base: str, pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, verify=ssl.create_default_context(cafile=str(pki.ca))) as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Page:
    """A fresh browser context (its own sessionStorage) on the console, with the errors the
    page logs (a CSP violation would be one)."""

    def __init__(self, browser: Any, base: str) -> None:
        self.context = browser.new_context(
            ignore_https_errors=True, viewport={"width": 1400, "height": 900}
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.urls: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.goto(f"{base}/ui")

    def log_in(self, key: str) -> Any:
        page = self.page
        page.wait_for_selector("#key-prompt", state="visible", timeout=WAIT_MS)
        page.fill("#key-input", key)
        page.click("#key-form button")
        page.wait_for_selector("#tabs", state="visible", timeout=WAIT_MS)
        self.errors.clear()  # the first probe's 401, before the key was given
        return page

    def shot(self, name: str) -> None:
        if not SCREENSHOTS:
            return
        path = Path(SCREENSHOTS) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        with contextlib.suppress(ImportError):  # a palette PNG is a third of the size
            from PIL import Image

            with Image.open(path) as image:
                image.convert("RGB").quantize(colors=128).save(path, optimize=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, base: str) -> Iterator[Page]:
    opened = Page(browser, base)
    yield opened
    opened.close()


def test_without_a_key_the_page_shows_only_the_key_prompt(page: Page, http: httpx.Client):
    p = page.page
    p.wait_for_selector("#key-prompt", state="visible", timeout=WAIT_MS)
    assert not p.is_visible("#tabs")
    for section in ("models", "live", "try", "reports"):
        assert not p.is_visible(f"#tab-{section}")
    assert p.inner_text("#models") == ""
    # Only the static shell and the session probe went out; every JSON endpoint says 401.
    for path in ("session", "models", "live", "reports", "reports/mlp/1/plot"):
        response = http.get(f"/ui/api/{path}")
        assert response.status_code == 401, path
        assert "API key" in response.json()["error"]
    page.errors = [e for e in page.errors if "401" not in e]  # the probe's own 401
    assert page.errors == []
    page.shot("key-prompt")


def test_a_wrong_key_is_refused_and_forgotten(page: Page):
    p = page.page
    p.wait_for_selector("#key-prompt", state="visible", timeout=WAIT_MS)
    p.fill("#key-input", "ssk_000000000000_" + "A" * 43)
    p.click("#key-form button")
    p.wait_for_function(
        "() => document.getElementById('key-error').textContent.includes('not accepted')",
        timeout=WAIT_MS,
    )
    assert not p.is_visible("#tabs")
    assert p.evaluate("() => sessionStorage.length") == 0


def test_the_page_lists_models_variants_and_degrade_targets(page: Page, keys: Keys):
    p = page.log_in(keys.admin)
    p.wait_for_selector('.model[data-model="tiny"]', timeout=WAIT_MS)
    names = p.eval_on_selector_all(".model", "els => els.map(e => e.dataset.model)")
    assert names == ["broken", "mlp", "shout", "slow", "tiny"]
    broken = p.locator('.model[data-model="broken"] tr[data-unit="broken/1"]')
    assert "UNAVAILABLE" in broken.inner_text()
    assert "onnx" in broken.locator(".reason").inner_text().lower()  # the load error, shown
    mlp = p.locator('.model[data-model="mlp"]')
    for unit in ("mlp/1", "mlp:int8/1", "mlp:fast/1", "mlp:pruned/1"):
        assert mlp.locator(f'tr[data-unit="{unit}"]').count() == 1
    row = mlp.locator('tr[data-unit="mlp:int8/1"]')
    assert "READY" in row.inner_text() and "int8" in row.inner_text()
    # p50 / p99 at batch 1 from variant.yaml; the bytes it holds while resident
    assert "0.0500 / 0.150" in row.inner_text() and "268 B" in row.inner_text()
    details = row.locator("details").text_content() or ""  # the rest: latency per batch...
    assert "latency_ms_by_batch" in details and "32: 0.0100" in details
    # The Pareto plot: the original (from the report) and three variants; int8 and fast are
    # within the 1-point quality budget, pruned is not.
    plot = mlp.locator("svg.pareto")
    assert plot.get_attribute("data-points") == "4"
    targets = plot.locator("circle.target")
    assert sorted(targets.evaluate_all("els => els.map(e => e.dataset.name)")) == ["fast", "int8"]
    # The key holds `manage` and the server allows model control: load/unload are offered.
    assert mlp.locator("button.manage").count() == 2
    # The key went in headers only: no URL the page asked for holds it, nothing persists it.
    secret = keys.admin.rsplit("_", 1)[-1]
    assert page.urls and not [u for u in page.urls if secret in u or keys.admin in u]
    assert p.evaluate("() => localStorage.length") == 0 and secret not in p.content()
    assert page.errors == []
    page.shot("models")


def test_a_key_sees_only_its_models_and_no_manage_buttons(page: Page, keys: Keys):
    p = page.log_in(keys.reader)
    p.wait_for_selector('.model[data-model="mlp"]', timeout=WAIT_MS)
    assert p.eval_on_selector_all(".model", "els => els.map(e => e.dataset.model)") == ["mlp"]
    assert p.locator("button.manage").count() == 0
    p.click('#tabs button[data-tab="live"]')
    p.wait_for_function(
        "() => document.getElementById('live-memory').textContent.includes('metrics')",
        timeout=WAIT_MS,
    )


def _load(base: str, pki: Pki, key: str, stop: threading.Event, llm: bool) -> int:
    """Requests until `stop` (bounded by the caller): to mlp and slow, or completions of tiny;
    how many succeeded."""
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]}
    slow = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [1] * 16}]}
    calls = [("/v2/models/mlp/infer", body), ("/v2/models/slow/infer", slow)]
    if llm:
        calls = [("/v1/completions", {"model": "tiny", "prompt": "once upon", "max_tokens": 16})]
    verify = ssl.create_default_context(cafile=str(pki.ca))
    done = 0
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, verify=verify, headers=auth, timeout=30) as c:
        while not stop.is_set():
            for path, doc in calls:
                if c.post(path, json=doc).status_code == 200:
                    done += 1
    return done


def test_live_charts_move_under_load(page: Page, keys: Keys, base: str, pki: Pki):
    p = page.log_in(keys.admin)
    p.click('#tabs button[data-tab="live"]')
    stop = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_load, base, pki, keys.admin, stop, i == 3) for i in range(4)]
        try:
            p.wait_for_function(
                "() => Number(document.getElementById('chart-rps').dataset.max) > 0",
                timeout=WAIT_MS,
            )
            p.wait_for_function(
                "() => [...document.querySelectorAll('#live-table tr[data-unit=\"mlp:\"] td.rps')]"
                ".some(td => Number(td.textContent) > 0)",
                timeout=WAIT_MS,
            )
            p.wait_for_function(  # the language model's tokens
                '() => [...document.querySelectorAll(\'#live-table tr[data-unit="tiny:"]'
                " td.tokens')].some(td => Number(td.textContent) > 0)",
                timeout=WAIT_MS,
            )
            p.wait_for_function(
                "() => Number(document.getElementById('chart-tokens').dataset.max) > 0",
                timeout=WAIT_MS,
            )
            # slow's queue fills under three clients: its variant takes a share of the traffic.
            p.wait_for_function(
                '() => [...document.querySelectorAll(\'#live-table tr[data-unit="slow:fast"]'
                " td.degraded')].some(td => parseFloat(td.textContent) > 0)",
                timeout=WAIT_MS,
            )
            first = float(p.get_attribute("#chart-rps", "data-max") or 0)
            drawn = int(p.get_attribute("#chart-rps", "data-points") or 0)
            if SCREENSHOTS:
                p.wait_for_timeout(10_000)  # some history in the charts
                page.shot("live")
            # The chart keeps drawing: one more point each second while the load runs.
            p.wait_for_function(
                f"() => Number(document.getElementById('chart-rps').dataset.points) > {drawn}",
                timeout=WAIT_MS,
            )
            canvases = p.evaluate("() => document.querySelectorAll('#chart-rps canvas').length")
        finally:
            stop.set()
        done = sum(f.result(timeout=30) for f in futures)
    assert done > 0 and first > 0 and canvases == 1
    assert p.locator('#live-table tr[data-unit="slow:"]').count() == 1
    assert "budget" in p.inner_text("#live-memory")
    assert page.errors == []


def test_a_chat_streams_tokens_into_the_page(page: Page, keys: Keys):
    p = page.log_in(keys.admin)
    p.click('#tabs button[data-tab="try"]')
    p.wait_for_selector('#try-model option[value="tiny"]', state="attached", timeout=WAIT_MS)
    p.select_option("#try-model", "tiny")
    assert p.is_visible("#try-chat")
    # Count how many times the answer grows while it streams in.
    p.evaluate(
        """() => { window.__growth = 0; new MutationObserver(() => window.__growth++)
        .observe(document.getElementById('chat-log'), {subtree: true, childList: true,
        characterData: true}); }"""
    )
    p.fill("#chat-input", "Hello there")
    p.click("#try-send")
    p.wait_for_function(
        "() => document.getElementById('try-meta').textContent.startsWith('answered by tiny')",
        timeout=60_000,
    )
    answer = p.inner_text("#chat-log .msg.assistant")
    assert answer.strip()
    assert p.evaluate("() => window.__growth") > 3  # the user's message, the bubble, then deltas
    assert "first token after" in p.inner_text("#try-meta")
    assert p.inner_text("#try-error") == ""
    page.shot("chat")


def test_a_bad_request_shows_the_servers_error(page: Page, keys: Keys, http: httpx.Client):
    p = page.log_in(keys.admin)
    p.click('#tabs button[data-tab="try"]')
    p.wait_for_selector('#try-model option[value="mlp"]', state="attached", timeout=WAIT_MS)
    p.select_option("#try-model", "mlp")
    bad = (
        '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 5], "data": [1,2,3,4,5]}]}'
    )
    p.fill("#try-body", bad)
    p.click("#try-send")
    p.wait_for_function("() => document.getElementById('try-error').textContent", timeout=WAIT_MS)
    shown = p.inner_text("#try-error")
    expected = http.post(
        "/v2/models/mlp/infer", content=bad, headers={"Authorization": f"Bearer {keys.admin}"}
    )
    assert expected.status_code == 400
    assert shown == f"400: {expected.json()['error']}"
    page.shot("error")


def test_text_goes_to_a_text_model_as_text(page: Page, keys: Keys):
    p = page.log_in(keys.admin)
    p.click('#tabs button[data-tab="try"]')
    p.wait_for_selector('#try-model option[value="shout"]', state="attached", timeout=WAIT_MS)
    p.select_option("#try-model", "shout")
    assert p.is_visible("#try-text") and not p.is_visible("#try-tensors")
    p.fill("#try-text-input", "a quiet sentence")
    p.click("#try-send")
    p.wait_for_function(
        "() => document.getElementById('try-meta').textContent.startsWith('answered')",
        timeout=WAIT_MS,
    )
    assert p.inner_text("#try-meta").startswith("answered by shout version 1")
    output = p.inner_text("#try-output")
    assert '"A QUIET SENTENCE"' in output and "16" in output


def test_a_good_request_shows_the_answer_and_the_variant(page: Page, keys: Keys):
    p = page.log_in(keys.admin)
    p.click('#tabs button[data-tab="try"]')
    p.wait_for_selector('#try-model option[value="mlp:int8"]', state="attached", timeout=WAIT_MS)
    p.select_option("#try-model", "mlp:int8")
    p.click("#try-send")  # the template: zeros of the declared shape
    p.wait_for_function(
        "() => document.getElementById('try-meta').textContent.startsWith('answered')",
        timeout=WAIT_MS,
    )
    assert p.inner_text("#try-meta").startswith("answered by mlp:int8 version 1")
    assert '"logits"' in p.inner_text("#try-output")


def test_reports_render_with_their_plots(page: Page, keys: Keys):
    p = page.log_in(keys.admin)
    p.click('#tabs button[data-tab="reports"]')
    card = p.locator('.report[data-report="mlp/1"]')
    card.wait_for(timeout=WAIT_MS)
    assert card.locator("tbody tr").count() == 4  # the original and three variants
    assert "prune:0.9+finetune" in card.inner_text()
    p.wait_for_function(
        "() => { const i = document.querySelector('img.report-plot');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=WAIT_MS,
    )
    assert card.locator("img.report-plot").get_attribute("src").startswith("blob:")
    assert card.locator("svg.pareto").get_attribute("data-points") == "4"
    assert page.errors == []
    page.shot("reports")


def test_page_headers_forbid_inline_scripts_and_framing(http: httpx.Client):
    response = http.get("/ui")
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in response.text and " on" + "click=" not in response.text
    assert http.post("/ui").status_code == 405
    assert http.get("/ui/static/../../keys.json").status_code == 404


def test_manage_buttons_unload_and_load_a_model(page: Page, keys: Keys):
    p = page.log_in(keys.admin)
    card = p.locator('.model[data-model="slow"]')
    card.wait_for(timeout=WAIT_MS)
    card.locator("button.manage", has_text="unload").click()
    p.wait_for_function(
        '() => document.querySelector(\'.model[data-model="slow"] tr[data-unit="slow/1"]\')'
        ".textContent.includes('UNAVAILABLE')",
        timeout=WAIT_MS,
    )
    card.locator("button.manage", has_text="load").first.click()
    p.wait_for_function(
        '() => document.querySelector(\'.model[data-model="slow"] tr[data-unit="slow/1"]\')'
        ".textContent.includes('READY')",
        timeout=WAIT_MS,
    )
    assert page.errors == []


def test_the_pages_quantiles_and_pareto_front(page: Page):
    """The arithmetic behind the live table and the plots, run in the browser as shipped."""
    p = page.page
    p.wait_for_selector("#key-prompt", state="visible", timeout=WAIT_MS)
    got = p.evaluate(
        """async () => {
        const live = await import('/ui/static/live.js');
        const pareto = await import('/ui/static/pareto.js');
        const le = [0.001, 0.01, 0.1, null];
        const before = {le, counts: [0, 10, 10, 10]};
        const now = {le, counts: [0, 60, 110, 110]};  // 50 in (1, 10] ms, 50 in (10, 100]
        const slow = {le, counts: [0, 10, 10, 20]};  // the new ones all above 100 ms
        const points = [{x: 1, y: 0.9}, {x: 2, y: 0.95}, {x: 3, y: 0.93}, {x: 0.5, y: 0.5}];
        return {
            p50: live.quantile(0.5, now, before), p99: live.quantile(0.99, now, before),
            none: live.quantile(0.5, before, before), inf: live.quantile(0.5, slow, before),
            front: pareto.paretoFront(points).map((q) => q.x),
            quality: [pareto.quality({accuracy: 0.8, agreement: 0.9}),
                      pareto.quality({agreement: 0.9})],
        };
    }"""
    )
    assert got["p50"] == pytest.approx(0.01)
    assert got["p99"] == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert got["none"] is None and got["inf"] == pytest.approx(0.1)
    assert got["front"] == [0.5, 1, 2]  # (3, 0.93) is beaten by (2, 0.95)
    assert got["quality"] == [0.8, 0.9]
