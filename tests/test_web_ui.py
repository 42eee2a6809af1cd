"""The web UI in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; scripts/setup.sh
--test installs it): the key prompt, a streamed reply, stop, regenerate, edit, reload and find the conversation,
rename and search, and text that looks like HTML shown as text. About 20 s."""

import json
import os

import time

import pytest

import gptchat
from gptchat.server import create_app
from gptchat.server.store import ConversationStore
from test_conversations import ENDLESS, KEY
from test_server import serving

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no /usr/bin/chromium (bash scripts/setup.sh --test installs it)", allow_module_level=True)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EVIL_USER = '<script>window.__xss = "user"</script>'
EVIL_REPLY = ('<img src=x onerror="window.__xss = \'reply\'"> and **bold** text, '
              '[a link](javascript:window.__xss=\'link\') and [a good one](https://example.org/)\n\n'
              '```html\n<script>window.__xss = "code"</script>\n```')


@pytest.fixture(scope="module")
def url(long_llama_dir, tmp_path_factory):
    lm = gptchat.load_model(long_llama_dir, quant="none")
    # the tiny model writes 1,500 tokens in about a second: slowed to ~3 ms a token, a long reply is still
    # running when the test clicks Stop, even on a busy machine
    lm.model.register_forward_pre_hook(lambda module, args: time.sleep(0.003))
    app = create_app(lm, model_name="tiny", api_key=KEY, store=ConversationStore.in_dir(tmp_path_factory.mktemp("d")))
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Playwright's waits evaluate strings, which the page's CSP forbids; bypassing it also means the
        # HTML-as-text test checks the Markdown renderer itself, without the CSP's safety net
        page = browser.new_page(bypass_csp=True)
        page.set_default_timeout(20_000)
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())
        page.goto(url + "/")
        yield page
        browser.close()


def ready(page):
    page.wait_for_selector("body[data-ready='1']", state="attached")


def test_key_send_stream_stop_reload(page, url):
    # the server wants a key: the page asks once and keeps it
    page.wait_for_selector("#key-dialog:not([hidden])")
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    ready(page)
    assert page.evaluate("localStorage.getItem('gptchat.apiKey')") == KEY

    # a short greedy reply
    page.click("#toggle-settings")
    page.fill("[data-setting=temperature]", "0")
    page.fill("[data-setting=max_tokens]", "6")
    page.fill("#input", "Hello browser")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant[data-status=complete]")
    assert page.inner_text(".message.user .body") == "Hello browser"
    page.wait_for_selector("#conversations li .title:text-is('Hello browser')")

    # regenerate: a second answer, with a branch switcher
    page.click(".message.assistant .regenerate")
    page.wait_for_selector(".message.assistant .branches:has-text('2/2')")
    page.click(".message.assistant .branches .prev")
    page.wait_for_selector(".message.assistant .branches:has-text('1/2')")

    # edit the message and resend: the user message gets a switcher too
    page.click(".message.user .edit")
    page.fill(".edit-box", "Hello again")
    page.click(".save-edit")
    page.wait_for_selector(".message.user .branches:has-text('2/2')")
    page.wait_for_selector(".message.assistant[data-status=complete]")
    assert page.inner_text(".message.user .body") == "Hello again"

    # a long reply streams in (its text grows while we watch), and Stop ends it; it is kept, marked stopped
    settings = {k: v for k, v in ENDLESS.items() if k != "logit_bias"}
    for name, value in settings.items():
        page.fill(f"[data-setting={name}]", str(value))
    page.dispatch_event("[data-setting=max_tokens]", "change")
    conv_id = page.evaluate("state.conversation.id")
    # the UI has no field for logit_bias: ban the end-of-text token through the API, as a script could
    page.evaluate("""([id, s]) => api.patch(`/api/conversations/${id}`, {settings: s})""", [conv_id, ENDLESS])
    page.fill("#input", "Tell me everything")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant.streaming .body:not(:empty)")
    first = page.inner_text(".message.assistant.streaming .body")
    page.wait_for_function("""(n) => {
        const el = document.querySelector('.message.assistant.streaming .body');
        return el && el.innerText.length > n; }""", arg=len(first))
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-status=stopped] .badge.stopped")
    assert page.is_visible("#send")
    stopped = page.inner_text(".message.assistant[data-status=stopped] .body")
    assert stopped.startswith(first.strip()[:20])

    # reload: the conversation is in the list and opens with the stopped reply
    page.reload()
    ready(page)
    page.click("#conversations li .title:text-is('Hello browser')")
    page.wait_for_selector(".message.assistant[data-status=stopped]")
    assert page.inner_text(".message.user >> nth=-1").find("Tell me everything") >= 0

    # rename and search
    page.hover("#conversations li:first-child")
    page.click("#conversations li:first-child .rename")
    page.fill(".rename-input", "Renamed chat")
    page.press(".rename-input", "Enter")
    page.wait_for_selector("#conversations li .title:text-is('Renamed chat')")
    page.fill("#search", "zzz-nothing")
    page.wait_for_function("document.querySelectorAll('#conversations li').length === 0")
    page.fill("#search", "renamed")
    page.wait_for_selector("#conversations li .title:text-is('Renamed chat')")
    page.fill("#search", "")

    # export the open conversation: the download is the server's export of it
    with page.expect_download() as download:
        page.click("#export-one")
    exported = json.loads(open(download.value.path()).read())
    assert [c["title"] for c in exported["conversations"]] == ["Renamed chat"]
    assert len(exported["conversations"][0]["messages"]) == 7  # a turn, a regeneration, an edited turn, the stopped turn

    # delete it (the confirmation is accepted)
    page.hover("#conversations li:first-child")
    page.click("#conversations li:first-child .delete")
    page.wait_for_function("![...document.querySelectorAll('#conversations .title')]"
                           ".some((b) => b.textContent === 'Renamed chat')")
    assert page.inner_text("#title") == "New conversation" and page.locator(".message").count() == 0
    assert page.errors == []


def test_html_in_messages_is_shown_as_text(page, tmp_path):
    ready(page)
    data = {"messages": [{"role": "user", "content": EVIL_USER}, {"role": "assistant", "content": EVIL_REPLY}]}
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(data))
    page.set_input_files("#import", str(path))  # the Import button
    page.wait_for_selector(".message.assistant .body strong")
    assert page.inner_text(".message.user .body") == EVIL_USER
    reply = page.inner_text(".message.assistant .body")
    assert '<img src=x onerror="window.__xss = \'reply\'">' in reply and '<script>window.__xss = "code"</script>' in reply
    assert page.inner_text(".message.assistant .body strong") == "bold"  # Markdown still rendered
    assert page.locator("#messages img, #messages script, #conversations script").count() == 0
    assert page.locator("#messages a").evaluate_all("links => links.map((a) => a.href)") == ["https://example.org/"]
    assert page.inner_text("#conversations li:first-child .title").startswith("<script>")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert page.errors == []


def test_token_probabilities_view(page, tmp_path):
    ready(page)
    lp = [{"token": "Hel", "logprob": -0.05, "bytes": [72, 101, 108],
           "top_logprobs": [{"token": "Hel", "logprob": -0.05, "bytes": [72, 101, 108]},
                            {"token": "<b>Hi", "logprob": -3.2, "bytes": [60, 98, 62, 72, 105]}]},
          {"token": "lo", "logprob": -1.6, "bytes": [108, 111], "top_logprobs": []}]
    data = {"title": "Probabilities", "messages": [
        {"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello", "logprobs": lp}]}
    path = tmp_path / "probs.json"
    path.write_text(json.dumps(data))
    page.set_input_files("#import", str(path))
    page.wait_for_selector("#title:text-is('Probabilities')")
    assert page.locator(".token").count() == 0
    if not page.is_visible("#settings"):
        page.click("#toggle-settings")
    page.check("#show-probs")
    page.wait_for_selector(".token")
    tokens = page.locator(".message.assistant .token")
    assert tokens.all_inner_texts() == ["Hel", "lo"]
    assert tokens.nth(0).get_attribute("title") == '95.1%\n"Hel" 95.1%\n"<b>Hi" 4.1%'
    tokens.nth(0).click()
    assert page.text_content(".token-detail") == '"Hel": 95.12%  —  top: "Hel" 95.1%,  "<b>Hi" 4.1%'
    assert page.locator("#messages b").count() == 0
    page.uncheck("#show-probs")
    assert page.errors == []
