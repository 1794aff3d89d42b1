"""Walk the README's MLflow steps in a real headless Chromium and screenshot what a first-time user sees.

    python -m benchmarks.mlflow_ui_tour --project PATH [--out docs] [--port 5055]
    python -m benchmarks.mlflow_ui_tour --url http://127.0.0.1:5000 --out /tmp/shots   # a server already running

PATH is a project after a finished `dvc repro` (its mlflow.db). The script starts
`mlflow server --backend-store-uri sqlite:///PATH/mlflow.db` on localhost (unless --url), then drives
Debian's Chromium (/usr/bin/chromium, /usr/bin/chromedriver; apt packages `chromium chromium-driver`)
through Selenium — nothing is downloaded at run time — along the README's steps:

  1. open the experiment's runs page link (`pipeline.tracking.runs_page`, printed by every stage:
     <ui>/#/experiments/<id>/runs?workflowType=machine_learning) in a fresh browser profile;
  2. search `tags.stage = 'evaluate'`, expand the pipeline run; Columns: tick fid_<space>, depth,
     schedule, steps                                   -> mlflow_runs_fid.png
  3. switch to the chart view on the same evaluate runs, search the charts for fid_<space>
     (FID per run; params depth, steps)
                                                       -> mlflow_fid_vs_steps.png
  4. the run page of the training run that logged the newest version of the registered model
     (--model, default the deepest `flexvar-d<depth>`): About this run shows MLflow's standard tags,
     Created by (mlflow.user), Source (mlflow.source.name, its type's icon, the git branch and
     mlflow.source.git.commit), and the registered model version it made
                                                       -> mlflow_run_page.png
  5. the model registry page of that model: every version with its tags, among them the FID of each
     schedule that evaluate tagged it with (fid_<space>/<schedule>)
                                                       -> mlflow_registry_versions.png

and prints a JSON summary: the page text of each view and the runs table's cells by run id and
column (the test reads every evaluate run's FID cell). Exit 2 with one line if Chromium or the chromedriver is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from flows.cluster import free_port
from pipeline.tracking import runs_page

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000"]
EXPERIMENT = "flexvar"
WAIT_S = 120


class TourError(RuntimeError):
    """A step of the tour could not be done (the UI did not show what the README says)."""


def browser_missing() -> str | None:
    """One line naming what is missing for the tour, or None."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
                f"(apt-get install -y chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


# --------------------------------------------------------------------------- the MLflow server

def start_server(project: Path, port: int, log_path: Path) -> subprocess.Popen:
    """`mlflow server` on the project's embedded store (artifacts served from mlartifacts/), healthy."""
    mlflow = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log = open(log_path, "w")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=project, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise TourError(f"mlflow server did not become healthy; see {log_path}")
        time.sleep(1)


def experiment_id(url: str) -> str:
    """The id of the experiment EXPERIMENT on the server at `url` (REST)."""
    query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as r:
            return json.loads(r.read())["experiment"]["experiment_id"]
    except OSError as e:
        raise TourError(f"no experiment {EXPERIMENT!r} at {url}: {e}") from None


def rest_get(url: str, endpoint: str, **query) -> dict:
    """GET `<url>/api/2.0/mlflow/<endpoint>` (MLflow's REST API) as JSON."""
    q = f"?{urllib.parse.urlencode(query)}" if query else ""
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}{q}", timeout=30) as r:
            return json.loads(r.read())
    except OSError as e:
        raise TourError(f"{endpoint} at {url}: {e}") from None


def transformer_model(url: str) -> str:
    """The registered `flexvar-d<depth>` model of the largest depth."""
    names = [m["name"] for m in rest_get(url, "registered-models/search", max_results=1000).get("registered_models", [])]
    depths = sorted(int(n.removeprefix("flexvar-d")) for n in names
                    if n.startswith("flexvar-d") and n.removeprefix("flexvar-d").isdigit())
    if not depths:
        raise TourError(f"no registered flexvar-d<depth> model at {url} (registered: {names})")
    return f"flexvar-d{depths[-1]}"


def newest_version(url: str, model: str) -> dict:
    """The newest version of registered model `model` (REST: version, run_id, tags)."""
    versions = rest_get(url, "model-versions/search", filter=f"name = '{model}'").get("model_versions", [])
    if not versions:
        raise TourError(f"registered model {model!r} has no versions at {url}")
    return max(versions, key=lambda v: int(v["version"]))


def ui_page(url: str, route: str) -> str:
    """A UI link in the Model training view (`workflowType=machine_learning`, as `runs_page` sets it)."""
    return f"{url.rstrip('/')}/#/{route}?workflowType=machine_learning"


# --------------------------------------------------------------------------- the browser
def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"          # Selenium Manager: never download a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait_for(driver, what: str, find, timeout: float = WAIT_S):
    """Poll `find()` until it returns something truthy; TourError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = find()
        except Exception:  # noqa: BLE001 - the page is still rendering; try again
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise TourError(f"timed out waiting for {what} at {driver.current_url}")


def by_text(driver, css: str, text: str):
    from selenium.webdriver.common.by import By

    return next((e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()
                 and e.text.strip() == text), None)


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def close_assistant(driver) -> None:
    """MLflow 3 opens its Assistant side panel on first visit; close it so the runs have the room."""
    from selenium.webdriver.common.by import By

    for b in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if b.is_displayed():
            b.click()
            return


def table_rows(driver) -> dict[str, dict[str, str]]:
    """The runs table as shown: run id -> {column id -> cell text} (ag-grid rows carry the run id as
    row-id; a row's pinned and scrolled parts are separate elements with the same row-id)."""
    return driver.execute_script("""
      const rows = {};
      document.querySelectorAll('[role=row][row-id]').forEach(r => {
        const cells = rows[r.getAttribute('row-id')] = rows[r.getAttribute('row-id')] || {};
        r.querySelectorAll('[role=gridcell][col-id]').forEach(c => { cells[c.getAttribute('col-id')] = c.innerText; });
      });
      return rows;""")


def search(driver, query: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = wait_for(driver, "the run search box", lambda: driver.find_element(By.CSS_SELECTOR, "input[data-testid='search-box']"))
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(query, Keys.ENTER)
    time.sleep(2)


def expand_pipeline_runs(driver) -> None:
    """Filtered child runs sit under their collapsed pipeline run: click the expander in its row."""
    from selenium.webdriver.common.by import By

    wait_for(driver, "a pipeline run row", lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, "a")
                                                    if e.is_displayed() and e.text.startswith("pipeline ")])
    for btn in driver.find_elements(By.CSS_SELECTOR, "[class*='ag-row'] button"):
        if btn.is_displayed() and not btn.text.strip() and btn.get_attribute("aria-label") is None:
            btn.click()
            time.sleep(1)


def tick_columns(driver, names: list[str]) -> None:
    """Columns dropdown: type each name in its search box and click its checkbox (ticks, or unticks a default)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def box():
        """The menu's search box; reopens the menu when a click closed it."""
        shown = [e for e in driver.find_elements(By.CSS_SELECTOR, "input[placeholder='Search columns']")
                 if e.is_displayed()]
        if not shown:
            by_text(driver, "button", "Columns").click()
            raise TourError("Columns menu was closed")
        return shown[0]

    def click(name: str) -> bool:
        menu = box().find_element(By.XPATH, "./ancestor::*[.//input[@type='checkbox']][1]")
        next(e for e in menu.find_elements(By.XPATH, f".//*[normalize-space(text())='{name}']")
             if e.is_displayed()).click()
        return True

    def typed(name: str) -> bool:
        b = box()
        b.send_keys(Keys.CONTROL, "a")
        b.send_keys(name)
        return True

    for name in names:
        wait_for(driver, "the column search box", lambda: typed(name))
        time.sleep(1)
        wait_for(driver, f"column {name} in the Columns menu", lambda: click(name))
        time.sleep(0.5)
    wait_for(driver, "the column search box", lambda: box().send_keys(Keys.ESCAPE) or True)
    time.sleep(1)


def chart_view(driver) -> None:
    """The second of the view switches above the runs (table | chart | evaluation)."""
    from selenium.webdriver.common.by import By

    radios = wait_for(driver, "the view switch", lambda: [e for e in driver.find_elements(
        By.CSS_SELECTOR, "label:has(input.du-bois-light-radio-button-input)") if e.is_displayed()])
    radios[1].click()
    time.sleep(3)


def filter_charts(driver, text: str) -> None:
    """Type into the chart view's 'Search metric charts' box (charts are alphabetical; FID is far down)."""
    from selenium.webdriver.common.by import By

    box = wait_for(driver, "the chart search box", lambda: next(iter(
        e for e in driver.find_elements(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
        if e.is_displayed()), None))
    box.send_keys(text)
    time.sleep(3)


def tour(url: str, out: Path, feature_space: str = "domain", model: str | None = None) -> dict:
    """The README's steps; returns the page text after each and the screenshot paths."""
    out.mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="flexvar-chromium-"))
    driver = chromium(profile)
    try:
        driver.get(runs_page(url, experiment_id(url)))
        wait_for(driver, "the runs page", lambda: "/runs" in driver.current_url and by_text(driver, "button", "Columns"))
        close_assistant(driver)
        search(driver, "tags.stage = 'evaluate'")
        expand_pipeline_runs(driver)
        tick_columns(driver, [f"fid_{feature_space}", "depth", "schedule", "steps"])
        wait_for(driver, "evaluate rows", lambda: "evaluate d" in body_text(driver))
        time.sleep(2)
        table_png = out / "mlflow_runs_fid.png"
        driver.save_screenshot(str(table_png))
        table_text, rows = body_text(driver), table_rows(driver)
        chart_view(driver)   # the same evaluate runs: FID per run, comparable across depth and steps (params)
        filter_charts(driver, f"fid_{feature_space}")
        wait_for(driver, "the FID chart", lambda: f"fid_{feature_space}" in body_text(driver))
        time.sleep(3)
        chart_png = out / "mlflow_fid_vs_steps.png"
        driver.save_screenshot(str(chart_png))
        chart_text = body_text(driver)

        model = model or transformer_model(url)
        version = newest_version(url, model)
        run_id = version["run_id"]
        driver.get(ui_page(url, f"experiments/{experiment_id(url)}/runs/{run_id}"))
        wait_for(driver, "the run page's About this run", lambda: all(
            t in body_text(driver) for t in ("About this run", "Created by", "Source", run_id, model)))
        time.sleep(2)
        run_png = out / "mlflow_run_page.png"
        driver.save_screenshot(str(run_png))
        run_text = body_text(driver)

        driver.set_window_size(1600, 1250)   # two versions' tags in view
        driver.get(ui_page(url, f"models/{urllib.parse.quote(model)}"))
        wait_for(driver, f"the versions of {model}", lambda: f"Version {version['version']}" in body_text(driver)
                 and f"fid_{feature_space}/" in body_text(driver))
        time.sleep(2)
        registry_png = out / "mlflow_registry_versions.png"
        driver.save_screenshot(str(registry_png))
        return {"table_text": table_text, "table_rows": rows, "chart_text": chart_text,
                "run_page": {"run_id": run_id, "text": run_text},
                "registry": {"model": model, "version": version["version"], "text": body_text(driver)},
                "screenshots": [str(table_png), str(chart_png), str(run_png), str(registry_png)],
                "url": driver.current_url}
    except TourError:
        driver.save_screenshot(str(out / "mlflow_tour_failed.png"))
        raise
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, help="project after a finished dvc repro (has mlflow.db)")
    ap.add_argument("--url", help="an MLflow server already running (instead of --project)")
    ap.add_argument("--port", type=int, default=0, help="port for the server started on --project (0: free)")
    ap.add_argument("--out", type=Path, default=Path("docs"), help="screenshot folder")
    ap.add_argument("--feature-space", default="domain")
    ap.add_argument("--model", help="registered model for the run and registry pages (default: the deepest flexvar-d<depth>)")
    args = ap.parse_args(argv)
    problem = browser_missing()
    if problem:
        print(f"mlflow_ui_tour: {problem}", file=sys.stderr)
        return 2
    if not args.url and not (args.project and (args.project / "mlflow.db").is_file()):
        print("mlflow_ui_tour: give --url or a --project holding mlflow.db (run dvc repro first)", file=sys.stderr)
        return 2
    server = None
    url = args.url
    if not url:
        port = args.port or free_port()
        server = start_server(args.project.resolve(), port, Path(tempfile.gettempdir()) / f"mlflow_tour_{port}.log")
        url = f"http://127.0.0.1:{port}"
    try:
        result = tour(url, args.out, args.feature_space, args.model)
    except TourError as e:
        print(f"mlflow_ui_tour: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({k: result[k] for k in ("screenshots", "url")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
