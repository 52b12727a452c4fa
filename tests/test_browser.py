"""The web page in headless Chromium (Debian chromium + chromium-driver):
it shows the live annotated stream and checkout events as they arrive."""

import pytest

from conftest import VIDEO, page_shows_stream_and_events


@pytest.mark.browser
def test_page_shows_stream_and_live_events(service, chromium, tmp_path):
    from selenium.webdriver.common.by import By

    svc = service({
        "cameras": [{"id": "cam0", "source": str(VIDEO), "loop": True, "realtime": True}],
        "zones": [{"id": "z0", "camera": "cam0", "line": {"p1": [0.5, 0], "p2": [0.5, 1]},
                   "tray_gap_s": 0.5, "tray_max_s": 2.0}],
    })
    drv = chromium
    drv.get(svc.base + "/")
    events = page_shows_stream_and_events(drv)
    assert "person" in events[0].text and "cam0/z0" in events[0].text
    stored = svc.get("/events").json()["items"]
    shown = {int(e.get_attribute("data-seq")) for e in drv.find_elements(By.CSS_SELECTOR, "#events li.event")}
    assert shown <= {e["seq"] for e in stored}
    drv.save_screenshot(str(tmp_path / "page.png"))
