"""The page at /plasticity/ui in a real headless browser (Debian's Chromium, driven by Playwright) against
the session's plasticity server (built-in model, API key, --training, --vectors-dir).

Each state is saved as a screenshot under .test-artifacts/ui/ (gitignored; CI keeps the folder). What the
page shows is compared with what the JSON API answers for the same request.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import requests
import torch

from tests.conftest import API_KEY, REPO
from vllm_plasticity.contract.bank import load_bank, save_bank

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / ".test-artifacts" / "ui"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "She opened the letter and"
CONCEPTS = ["calm", "storm", "letter", "door"]
TOL = 1e-4

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make setup installs it)")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        # The flags this machine's closed network needs (no background connections) and root needs.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def ui_bank(plasticity_server, default_model):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(7)
    vectors = {L: torch.randn(len(CONCEPTS), 128, generator=g) for L in (1, 3)}
    from transformers import AutoTokenizer

    # "storm" at the last layer is the output embedding of the word token with the largest one: steered far
    # enough, that token wins the next-token choice whatever the session's other tests taught the shared
    # model (a random direction did not always change the text of a model trained to repeat a fact).
    head = load_file(str(Path(default_model) / "model.safetensors"))["lm_head.weight"]
    tok = AutoTokenizer.from_pretrained(default_model)
    words = [i for i in range(head.shape[0]) if tok.decode([i]).strip().isalpha()]
    vectors[3][CONCEPTS.index("storm")] = head[max(words, key=lambda i: head[i].norm().item())]
    save_bank(Path(plasticity_server.vectors_dir) / "ui-bank", CONCEPTS, vectors, model="test", method="random")
    return "ui-bank"


@pytest.fixture()
def page(browser, plasticity_server):
    """A page with the key already entered (as a user who typed it once), and the console errors it logs."""
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    context.add_init_script(f"localStorage.setItem('plasticity-api-key', {API_KEY!r})")
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(plasticity_server.url + "/plasticity/ui")
    wait_status(page, "ready", timeout=30000)
    yield page
    context.close()


def status(page) -> str:
    return page.locator("#status").inner_text()


def wait_status(page, prefix: str, timeout: float = 120000) -> None:
    # Locator waits run in Playwright's isolated world: the page's content security policy (no eval) allows them.
    sync_api.expect(page.locator("#status")).to_have_text(re.compile("^" + re.escape(prefix)), timeout=timeout)


def api_completion(server, model, **body) -> dict:
    r = requests.post(server.url + "/v1/completions", headers=AUTH, timeout=120,
                      json={"model": model, "prompt": PROMPT, "temperature": 0, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def load_in_page(page, bank: str) -> None:
    page.select_option("#available-select", bank)
    page.click("#load-bank")
    wait_status(page, f"loaded {bank}")


def shown_scores(page) -> dict[int, float]:
    return {int(k): float(v) for k, v in page.eval_on_selector_all(
        ".tok[data-score]", "els => els.map(e => [e.dataset.position, e.dataset.score])")}


def test_without_the_key_the_pages_requests_are_refused(browser, plasticity_server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(plasticity_server.url + "/plasticity/ui")
    sync_api.expect(page.locator("#status")).to_have_class(re.compile("error"), timeout=30000)
    assert "API key" in status(page) and status(page).startswith("missing or wrong API key")
    assert page.locator("#model-name").inner_text() == ""  # nothing about the model was shown
    page.screenshot(path=str(ARTIFACTS / "0-no-key.png"), full_page=True)
    context.close()
    # The page itself holds no data; what it reads is refused without the key.
    assert requests.get(plasticity_server.url + "/readout/available", timeout=10).status_code == 401


def test_scores_on_the_text_equal_the_json_api(page, plasticity_server, default_model, ui_bank):
    model = str(default_model)
    load_in_page(page, ui_bank)
    assert page.locator("#bank-select").input_value() == ui_bank
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "10")
    page.click("#generate")
    wait_status(page, "scored")
    page.screenshot(path=str(ARTIFACTS / "1-scores.png"), full_page=True)

    expected = api_completion(plasticity_server, model, max_tokens=10, vllm_xargs={"readout": ui_bank})
    ids = expected["prompt_token_ids"] + expected["token_ids"]
    texts = page.eval_on_selector_all(".tok", "els => els.map(e => e.textContent)")
    assert len(texts) == len(ids)
    assert "".join(texts) == PROMPT + expected["text"]
    readout = expected["readout"]
    assert readout["layers"] == [1, 3] and readout["concepts"] == CONCEPTS

    def check(layer_index: int, concept_index: int) -> None:
        shown = shown_scores(page)
        assert sorted(shown) == readout["positions"] == list(range(len(ids) - 1))  # the last token is never fed
        for p in readout["positions"]:
            assert abs(shown[p] - readout["scores"][p][layer_index][concept_index]) <= TOL

    check(0, 0)
    # Switching concept and layer recolours from the scores already held: no new request.
    requests_seen = []
    page.on("request", lambda r: requests_seen.append(r.url))
    page.select_option("#concept-select", "2")
    page.select_option("#layer-select", "1")
    check(1, 2)
    assert requests_seen == []
    colours = page.eval_on_selector_all(".tok[data-score]", "els => new Set(els.map(e => e.style.backgroundColor)).size")
    assert colours > 1  # a diverging scale, not one colour
    assert page.locator("#chart polyline").count() == 3  # three concepts charted by default
    page.screenshot(path=str(ARTIFACTS / "2-concept-switched.png"), full_page=True)

    # Hovering a token lists its top concepts at the chosen layer, highest first.
    position = 3
    page.hover(f".tok[data-position='{position}']")
    tip = page.locator("#tooltip")
    assert tip.is_visible()
    scores = readout["scores"][position][1]
    top = [c for _, c in sorted(zip(scores, CONCEPTS), reverse=True)]
    lines = tip.inner_text().splitlines()
    assert lines[1].startswith("layer 3")
    assert [line.split()[0] for line in lines[2:]] == top
    page.screenshot(path=str(ARTIFACTS / "3-hover.png"), full_page=True)
    assert page.errors == []


def test_a_steering_slider_changes_the_output(page, plasticity_server, default_model, ui_bank):
    model = str(default_model)
    page.select_option("#bank-select", ui_bank) if page.locator(f"#bank-select option[value='{ui_bank}']").count() else load_in_page(page, ui_bank)
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "12")
    # The slider's far end: strong enough to change the text even after other tests trained the shared model.
    page.eval_on_selector("#sliders input[name='storm']", "el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
    page.click("#steer-generate")
    wait_status(page, "steered with 1 concept")
    plain, steered = page.locator("#plain-out").inner_text(), page.locator("#steered-out").inner_text()
    page.screenshot(path=str(ARTIFACTS / "4-steered.png"), full_page=True)
    assert plain == api_completion(plasticity_server, model, max_tokens=12)["text"]
    assert steered == api_completion(plasticity_server, model, max_tokens=12,
                                     vllm_xargs={"steer": [f"{ui_bank}/storm", 40.0]})["text"]
    assert steered != plain
    assert page.errors == []


@pytest.fixture(scope="module")
def ui_calibrated_bank(plasticity_server, ui_bank):
    """ui-bank's vectors with a calibration: scale 1 for every concept and layer, so natural strength 40 (the
    natural slider's end) is the raw coefficient 40 (the raw slider's end) the test above steers with."""
    from vllm_plasticity.contract.bank import Calibration, load_bank

    raw = load_bank(Path(plasticity_server.vectors_dir) / ui_bank)
    g = torch.Generator().manual_seed(8)
    calibration = Calibration({L: torch.randn(128, generator=g) for L in raw.layers},
                              {L: torch.full((len(CONCEPTS),), 1.0) for L in raw.layers},
                              {"centre": "corpus", "steering_range": {  # as the extractor records it (steering_range.py)
                                  "1": {"low": None, "high": 8.0}, "3": {"low": 16.0, "high": 32.0}}})
    save_bank(Path(plasticity_server.vectors_dir) / "ui-cal", CONCEPTS, raw.vectors, model="test", method="random",
              calibration=calibration)
    return "ui-cal"


def test_a_calibrated_banks_legend_and_sliders_use_its_units(page, plasticity_server, default_model, ui_calibrated_bank):
    model, bank = str(default_model), ui_calibrated_bank
    load_in_page(page, bank)
    units = page.locator("#steer-units").inner_text()
    assert "natural units" in units
    # the measured recommendation, per layer; a layer where no strength moved the text recommends nothing
    assert units.endswith("recommended strength at one layer, measured on this model at extraction: layer 3: 16 to 32")
    assert page.eval_on_selector("#sliders input[name='storm']", "el => el.max") == "40"
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "10")
    page.click("#generate")
    wait_status(page, "scored")
    assert page.locator("#legend-units").inner_text().startswith("calibrated: 0 = as the corpus on average")
    readout = api_completion(plasticity_server, model, max_tokens=10, vllm_xargs={"readout": bank})["readout"]
    assert readout["calibrated"] is True
    shown = shown_scores(page)
    assert sorted(shown) == readout["positions"]
    for p in readout["positions"]:
        assert abs(shown[p] - readout["scores"][p][0][0]) <= TOL
    page.fill("#max-tokens", "12")
    page.eval_on_selector("#sliders input[name='storm']", "el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
    page.click("#steer-generate")
    wait_status(page, "steered with 1 concept")
    steered = page.locator("#steered-out").inner_text()
    page.screenshot(path=str(ARTIFACTS / "4b-calibrated.png"), full_page=True)
    assert steered == api_completion(plasticity_server, model, max_tokens=12,
                                     vllm_xargs={"steer": [f"{bank}/storm", 40.0]})["text"]
    # natural strength 40 at scale 1 is the raw 40 of the raw bank's slider end
    r = requests.post(plasticity_server.url + "/readout/load", headers=AUTH, timeout=60,
                      json={"name": "ui-bank", "path": "ui-bank"})
    assert r.status_code == 200, r.text
    assert steered == api_completion(plasticity_server, model, max_tokens=12,
                                     vllm_xargs={"steer": ["ui-bank/storm", 40.0]})["text"]
    # A bank with steer rows (extracted since they exist): the sliders count the concepts' mean offsets.
    cal = load_bank(Path(plasticity_server.vectors_dir) / bank).calibration
    g = torch.Generator().manual_seed(9)
    offsets = dataclasses.replace(cal, info={**cal.info, "steer": "concept_mean_offset"},
                                  steer={L: torch.randn(len(CONCEPTS), 128, generator=g) for L in cal.centre})
    save_bank(Path(plasticity_server.vectors_dir) / "ui-offsets", CONCEPTS, load_bank(
        Path(plasticity_server.vectors_dir) / bank).vectors, model="test", method="random", calibration=offsets)
    page.reload()  # the page lists the vectors directory when it loads and after each load it makes
    wait_status(page, "ready", timeout=30000)
    load_in_page(page, "ui-offsets")
    # 8 at one layer (steering_real.md); the bank's two layers steered at once add up: half each.
    assert "average offset from the corpus average" in page.locator("#steer-units").inner_text()
    assert "2 layers steered at once add up, so the sliders reach 4 (8 at one layer)" in page.locator("#steer-units").inner_text()
    assert page.eval_on_selector("#sliders input[name='storm']", "el => el.max") == "4"
    page.fill("#steer-layers", "3")  # one layer typed: the one-layer range
    assert page.eval_on_selector("#sliders input[name='storm']", "el => el.max") == "8"
    assert "add up" not in page.locator("#steer-units").inner_text()
    page.eval_on_selector("#sliders input[name='storm']", "el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
    page.fill("#steer-layers", "1,3")  # two again: a strength past the new end comes down to it, shown
    assert page.eval_on_selector("#sliders input[name='storm']", "el => [el.max, el.value]") == ["4", "4"]
    assert page.locator("#sliders label[data-concept='storm'] output").inner_text() == "4"
    assert page.errors == []


def test_the_training_panel_teaches_a_chat_answer_through_the_chat_template(page, plasticity_server):
    """The panel starts in chat mode on a model with a chat template, and teaches the answer as a chat
    request will see it: the samples are the server's /train/convert (plasticity train's conversion)."""
    assert page.locator("#train-mode-chat").is_checked() and page.locator("#train-question").is_visible()
    assert not page.locator("#train-context").is_visible()
    assert page.input_value("#train-lr") == "0.01"  # the built-in model's size: its fact-learning rate
    question, answer = "Who rows the night ferry?", "Old Tamsin with the lantern."
    page.fill("#train-question", question)
    page.fill("#train-answer", answer)
    page.fill("#train-steps", "25")
    page.click("#teach")
    wait_status(page, "taught in 25 steps", timeout=300000)
    assert page.locator("#train-before").inner_text().strip() != answer
    assert page.locator("#train-after").inner_text().strip() == answer
    page.screenshot(path=str(ARTIFACTS / "5a-taught-chat.png"), full_page=True)
    # the answer is what a chat request now gets
    model = requests.get(plasticity_server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
    chat = requests.post(plasticity_server.url + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"].strip() == answer
    assert page.errors == []


def test_the_training_panel_teaches_a_fact_and_checkpoints(page):
    assert page.locator("#train-panel").is_visible()
    page.click("#train-mode-text")
    page.fill("#train-context", "The keeper of the lighthouse was called")
    page.fill("#train-continuation", " Ottoline Brask")
    page.fill("#train-steps", "25")
    page.fill("#train-lr", "0.01")
    page.click("#teach")
    wait_status(page, "taught in 25 steps", timeout=300000)
    assert page.locator("#train-before").inner_text() != " Ottoline Brask"
    assert page.locator("#train-after").inner_text() == " Ottoline Brask"
    assert page.locator("#loss-chart polyline").count() == 1
    page.screenshot(path=str(ARTIFACTS / "5-taught.png"), full_page=True)
    page.click("#checkpoint")
    wait_status(page, "checkpoint written", timeout=300000)
    assert "checkpoint: " in page.locator("#train-log").inner_text()
    page.screenshot(path=str(ARTIFACTS / "6-checkpoint.png"), full_page=True)
    assert page.errors == []
