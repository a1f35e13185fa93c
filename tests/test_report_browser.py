"""report.html in a real headless Chromium: it loads without console errors, every image decodes,
the findings box is at the top, sortable tables sort on a header click, and data stays text.

Skips where no Chromium is installed (Debian: ``apt-get install chromium``), unless
AUDITBENCH_REQUIRE_BROWSER is set (CI sets it, so a missing browser fails there instead of hiding).
The screenshot goes to $AUDITBENCH_TEST_ARTIFACTS/report_browser/ when set, else to pytest's tmp folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from headless_chromium import HeadlessChromium, find_chromium
from test_report import phantom
from test_report_models import HOSTILE, make_source_tables

from auditbench.report.html import render_report
from auditbench.report.overlays import overlay_png
from auditbench.report.tables import write_tables

ARTIFACTS_ENV = "AUDITBENCH_TEST_ARTIFACTS"
REQUIRE_ENV = "AUDITBENCH_REQUIRE_BROWSER"
# Per model: best and worst lung_mass, the internal true positive and true negative, the external
# false positive, the 3 per-source examples; and the colour bar.
N_IMAGES = 3 * (2 + 2 + 1 + 3) + 1


@pytest.fixture(scope="module")
def chromium() -> str:
    executable = find_chromium()
    if executable is None:
        reason = ("no Chromium found (tried $AUDITBENCH_CHROMIUM, chromium, chromium-browser, google-chrome); "
                  "install Debian's chromium to run the headless-browser test of report.html")
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {reason}")
        pytest.skip(reason)
    return executable


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get(ARTIFACTS_ENV)
    folder = Path(root) / "report_browser" if root else tmp_path_factory.mktemp("report_browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(chromium, artifacts, tmp_path_factory):
    """The hand-made run of test_report (3 models, external set, validation, gallery; with
    test_report_models' per-source examples) opened in Chromium: (browser, session id, events seen
    while loading)."""
    out = tmp_path_factory.mktemp("browser_run")
    tables = make_source_tables()
    write_tables(tables, out)
    (out / "gallery").mkdir()
    image, heat, lung, artifact = phantom()
    for file in tables.gallery["file"]:
        (out / file).write_bytes(overlay_png(image, heat, lung, artifact))
    report = render_report(out)
    with HeadlessChromium(chromium, tmp_path_factory.mktemp("chromium_profile")) as browser:
        session = browser.open_page()
        events = browser.navigate(session, report.as_uri())
        events += browser.drain_events()
        browser.screenshot(session, artifacts / "report.png")
        yield browser, session, events


def errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, failed loads and dialogs among CDP events."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(f"console.{params['type']}: {[a.get('value', a.get('description')) for a in params['args']]}")
        elif method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails']}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            found.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
        elif method == "Page.javascriptDialogOpening":
            found.append(f"dialog: {params.get('message')}")
    return found


def test_loads_without_console_errors_and_every_image_decodes(page, artifacts):
    browser, session, events = page
    assert errors(events) == []
    images = browser.evaluate(session, "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) == N_IMAGES
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert (artifacts / "report.png").stat().st_size > 10_000  # a rendered page, not a blank PNG


def test_findings_box_is_the_first_section_and_in_view(page):
    browser, session, _ = page
    box = browser.evaluate(session, """(() => {
        const box = document.getElementById('findings');
        if (!box) return null;
        const rect = box.getBoundingClientRect();
        return {first: document.querySelector('main section') === box,
                beforeRanking: !!(box.compareDocumentPosition(document.getElementById('ranking'))
                                  & Node.DOCUMENT_POSITION_FOLLOWING),
                top: rect.top + window.scrollY, height: rect.height, viewport: window.innerHeight,
                items: Array.from(box.querySelectorAll('li')).map(li => li.textContent.replace(/\\s+/g, ' ').trim())};
    })()""")
    assert box is not None, "no #findings element"
    assert box["first"] and box["beforeRanking"]
    assert box["top"] < box["viewport"] and box["height"] > 0  # seen without scrolling
    assert any("Selected model: r18-crop-s0." in item for item in box["items"])
    assert any("Source shortcut suspected:" in item and "'ext_normal'" in item for item in box["items"])


def test_findings_link_lands_on_the_external_errors_of_the_selected_model(page):
    browser, session, _ = page
    target = browser.evaluate(session, """(() => {
        const link = document.querySelector('#findings a[href^="#errors-"]');
        const target = link && document.getElementById(link.getAttribute('href').slice(1));
        return target && {inDecisions: !!target.closest('#decisions'), text: target.textContent,
                          model: target.closest('.decision-model').querySelector('h3').textContent,
                          images: Array.from(target.nextElementSibling.querySelectorAll('img')).map(i => i.alt)};
    })()""")
    assert target is not None, "no findings link to an element of the page"
    assert target["inDecisions"] and "ext_normal" in target["text"] and target["model"].startswith("r18-crop-s0")
    assert target["images"] == ["false positive ext-1 on ext_normal"]


def header_centre(browser, session, table: str, name: str) -> dict:
    """Scroll a header of a table into view; its centre and the element a click there would hit."""
    return browser.evaluate(session, f"""(() => {{
        const th = Array.from(document.querySelectorAll('{table} thead th'))
            .find(th => th.textContent.replace(/\\s+/g, ' ').trim().split(' ')[0] === {name!r});
        th.scrollIntoView({{block: 'center', inline: 'center'}});
        const r = th.getBoundingClientRect();
        const x = r.left + r.width / 2, y = r.top + r.height / 2;
        return {{x, y, hits: th.contains(document.elementFromPoint(x, y)), column: th.cellIndex}};
    }})()""")


def column(browser, session, table: str, index: int) -> list[str]:
    return browser.evaluate(session, f"""Array.from(document.querySelectorAll('{table} tbody tr'))
        .map(tr => tr.cells[{index}].textContent.replace(/\\s+/g, ' ').trim())""")


def test_ranking_table_sorts_when_a_header_is_clicked(page):
    browser, session, _ = page
    models_before = column(browser, session, "#ranking table", 1)
    header = header_centre(browser, session, "#ranking table", "lung_mass")
    assert header["hits"], "the lung_mass header is covered at its centre"
    browser.click(session, header["x"], header["y"])
    values = [float(v.split()[0]) for v in column(browser, session, "#ranking table", header["column"])]
    models_after = column(browser, session, "#ranking table", 1)
    assert values == sorted(values) and models_after != models_before  # ascending, and the rows moved
    assert models_after[0].startswith("r18-nocrop-s1")  # lowest lung_mass (0.31)
    header = header_centre(browser, session, "#ranking table", "lung_mass")
    browser.click(session, header["x"], header["y"])
    values = [float(v.split()[0]) for v in column(browser, session, "#ranking table", header["column"])]
    assert values == sorted(values, reverse=True)
    assert browser.evaluate(session, """Array.from(document.querySelectorAll('#ranking thead th'))
        .filter(th => th.getAttribute('aria-sort')).map(th => th.getAttribute('aria-sort'))""") == ["descending"]
    assert errors(browser.drain_events()) == []


def test_undefined_values_sort_last_both_ways(page):
    browser, session, _ = page
    for _ in range(2):
        header = header_centre(browser, session, "#ranking table", "artifact_mass")
        browser.click(session, header["x"], header["y"])
        cells = column(browser, session, "#ranking table", header["column"])
        assert cells[-1] == "n/a" and all(c != "n/a" for c in cells[:-1]), cells


def test_data_strings_stay_text_in_the_browser(page):
    browser, session, _ = page
    state = browser.evaluate(session, """({scripts: document.scripts.length,
        title: document.querySelector('h1').textContent,
        skipped: Array.from(document.querySelectorAll('#data td')).map(td => td.textContent),
        bold: document.querySelectorAll('#data td b').length})""")
    assert state["scripts"] == 1  # only the report's own sort script; no sample id or source became a <script>
    assert state["title"] == "auditbench report: quick <demo>"
    assert "data/<b>bad</b>.png" in state["skipped"] and state["bold"] == 0


def test_models_section_shows_sources_as_text_and_their_images(page):
    browser, session, _ = page
    state = browser.evaluate(session, """(() => {
        const block = document.querySelector('#models .model-detail');
        return {model: block.querySelector('h3 .id').textContent,
                sources: Array.from(block.querySelectorAll('h5 > .id')).map(e => e.textContent),
                images: Array.from(block.querySelectorAll('img')).map(i => [i.naturalWidth, i.alt]),
                matrices: block.querySelectorAll('table.cm').length};
    })()""")
    assert state["model"] == "r18-crop-s0" and state["matrices"] == 2
    assert state["sources"] == ["ieee8023", "kermany", HOSTILE]  # the hostile name shown as written
    assert len(state["images"]) == 3 and all(width > 0 for width, _ in state["images"])
    assert state["images"][-1][1] == f"wrong call ext-1 from {HOSTILE} on ext_normal"
