"""The dashboard in a real headless Chromium against a real server.

`bitplan serve` (uvicorn, SQLite, inline workers) runs on loopback; a small random ResNet20 job
is submitted with the CLI; Chromium, driven by Selenium through the Debian `chromedriver`, opens
`/`, takes the key and shows the job running, then finished without a reload (the page polls),
opens its report and re-solves its profile at a new budget, and shows a refused budget's reason.
Screenshots of each step land in the test's tmp folder.

Skipped with the reason when Chromium, its driver or the selenium package is missing (`.ci/run`
installs the Debian packages `chromium` and `chromium-driver`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.deploy import bitplan, serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
WAIT_SECONDS = 30
JOB_SECONDS = 600

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k != "BITPLAN_DATABASE_URL"},
        "BITPLAN_HOME": str(tmp_path / "home"),
        "BITPLAN_EXECUTOR": "inline",
    }


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with serving(env, tmp_path / "serve.log") as url:
        yield url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    service = webdriver.ChromeService(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_shows_a_finished_job_its_report_and_a_resolve(
    server: str,
    env: dict[str, str],
    browser: webdriver.Chrome,
    resnet20_inputs: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    key = bitplan("keys", "create", "--tenant", "browser", env=env).strip()
    remote = {**env, "BITPLAN_SERVER": server, "BITPLAN_API_KEY": key}
    weights, images = resnet20_inputs
    job_id = bitplan(
        *("submit", "--model", "zoo:cifar_resnet20", "--weights", str(weights)),
        *("--calib", str(images), "--eval", str(images), "--calib-samples", "32"),
        *("--batch-size", "16", "--method", "fisher", "--budget", "avg-bits=4"),
        env=remote,
    ).strip()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    # The job table is redrawn while the job runs: look elements up afresh, retry stale ones.
    wait = WebDriverWait(browser, WAIT_SECONDS, ignored_exceptions=[StaleElementReferenceException])
    row = f"tr[data-job-id='{job_id}']"

    browser.get(server + "/")
    browser.save_screenshot(str(shots / "1-key.png"))
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "use-key").click()
    first_status = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{row} .status").text)
    # Loading the model and the calibration statistics alone take seconds: the job is still on.
    assert first_status in ("queued", "running")
    browser.execute_script("window.notReloaded = true")
    browser.save_screenshot(str(shots / "2-running.png"))

    WebDriverWait(browser, JOB_SECONDS).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f"{row} button.report")
    )
    assert browser.execute_script("return window.notReloaded") is True
    result = json.loads(bitplan("wait", job_id, "--json", env=remote))
    shown = browser.find_element(By.CSS_SELECTOR, row)
    assert shown.find_element(By.CSS_SELECTOR, ".status").text == "succeeded"
    assert "zoo:cifar_resnet20" in shown.text and "avg-bits=4" in shown.text
    assert f"{result['avg_weight_bits']:.3f} bits" in shown.text
    browser.save_screenshot(str(shots / "3-finished.png"))

    browser.find_element(By.CSS_SELECTOR, f"{row} button.report").click()
    frame = wait.until(ec.visibility_of_element_located((By.ID, "report-frame")))
    assert browser.find_element(By.ID, "report-job").text == job_id
    browser.switch_to.frame(frame)
    heading = wait.until(ec.presence_of_element_located((By.TAG_NAME, "h1")))
    assert heading.text == "bitplan report: zoo:cifar_resnet20 at avg-bits=4"
    images_shown = browser.find_elements(By.TAG_NAME, "img")
    assert len(images_shown) == 3
    assert all(
        browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images_shown
    )
    assert "Spearman" in browser.find_element(By.TAG_NAME, "body").text
    browser.switch_to.default_content()
    browser.save_screenshot(str(shots / "4-report.png"))

    browser.find_element(By.CSS_SELECTOR, f"{row} button.resolve").click()
    budget = wait.until(ec.visibility_of_element_located((By.ID, "budget")))
    assert budget.get_attribute("value") == "avg-bits=4"
    budget.clear()
    budget.send_keys("avg-bits=3")
    browser.find_element(By.ID, "solve-button").click()
    summary = wait.until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#solve-answer .solution-summary"))
    )
    assert summary.text.startswith("avg-bits=3: ")
    assert " optimal " in summary.text or " feasible " in summary.text
    resolved_bits = float(summary.text.split(": ")[1].split(" bits")[0])
    assert resolved_bits < result["avg_weight_bits"]
    layers = browser.find_elements(By.CSS_SELECTOR, "#solve-answer table.allocation tbody tr")
    assert len(layers) == len(result["allocation"])
    browser.save_screenshot(str(shots / "5-resolve.png"))

    budget.clear()
    budget.send_keys("avg-bits=0.5")
    browser.find_element(By.ID, "solve-button").click()
    refusal = wait.until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#solve-answer .solve-error"))
    )
    assert "smallest feasible size" in refusal.text
    browser.save_screenshot(str(shots / "6-refused.png"))
    assert len(list(shots.glob("*.png"))) == 6
