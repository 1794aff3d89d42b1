"""Screenshot every declared plot of dvc.yaml as `dvc plots show` draws it in a real browser.

    python -m benchmarks.dvc_plots_shots [--project .] [--out docs/dvc_plots] [--vega-dir .cache/vega]
    python -m benchmarks.dvc_plots_shots --diff workspace lr-1e-3 --out docs/dvc_plots_diff   # dvc plots diff

In the project, `dvc plots show --json` lists the declared plots (name, type, the filled Vega-Lite spec)
and `dvc plots show` writes its page, dvc_plots/index.html. The page is opened in Debian's headless
Chromium through Selenium (the browser of benchmarks/mlflow_ui_tour.py); once Vega has drawn each plot's
canvas (an image plot: once its <img> has loaded), the plot's element is saved as <out>/<name>.png, where
<name> is the plot's path without its extension, '/' -> '_' (plots/train/d2/val.csv -> plots_train_d2_val.png).

DVC's page loads Vega, Vega-Lite and vega-embed from a CDN, which this machine cannot reach: the page is
opened from a copy in a temporary folder whose three <script src> point at the files that CDN serves for
those exact versions (each package's `jsdelivr` entry; charset utf-8, as the CDN sends them), taken from the
npm registry with `npm pack` and kept in --vega-dir. Nothing else of the page changes.

Prints a JSON summary, one entry a plot: the PNG, and for a Vega plot its title, the x and y fields and
their axis titles, and the number of points. Exits 1 naming a plot that has no title or an unnamed axis,
or that the browser did not draw; 2 with one line if Chromium, the chromedriver or npm is missing.
With --diff REV..., the same for `dvc plots diff REV...` (revisions or `dvc exp` names: one curve per
revision in every plot).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.mlflow_ui_tour import TourError, browser_missing, chromium, wait_for

CDN_SCRIPT = re.compile(r'<script src="(https://cdn\.jsdelivr\.net/npm/([a-z0-9-]+)@([0-9][0-9.]*))"></script>')
SCALE = 2   # device pixels per CSS pixel: the canvases are drawn at twice the resolution, crisp in docs


def dvc(project: Path, *args: str) -> str:
    dvc_bin = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(dvc_bin), *args], cwd=project, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise TourError(f"dvc {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def shot_name(plot: str) -> str:
    return str(Path(plot).with_suffix("")).replace("/", "_").replace("\\", "_") + ".png"


def div_id(plot: str) -> str:
    """The id DVC gives a plot's element in its page (dvc_render's Renderer.remove_special_chars)."""
    from dvc_render.base import Renderer

    return Renderer.remove_special_chars(plot)


# --------------------------------------------------------------------------- what each plot declares
def encodings(spec) -> list[dict]:
    """Every `encoding` in a (layered) Vega-Lite spec, outermost first."""
    found = []
    if isinstance(spec, dict):
        if isinstance(spec.get("encoding"), dict):
            found.append(spec["encoding"])
        for v in spec.values():
            found += encodings(v)
    elif isinstance(spec, list):
        for v in spec:
            found += encodings(v)
    return found


def axis(spec: dict, channel: str) -> dict:
    """The first encoding of `channel` (x or y) that names a field."""
    return next((e[channel] for e in encodings(spec) if isinstance(e.get(channel), dict) and e[channel].get("field")), {})


def describe(plot: str, spec: dict) -> dict:
    title = spec.get("title")
    title = title.get("text") if isinstance(title, dict) else title
    x, y = axis(spec, "x"), axis(spec, "y")
    out = {"title": title or "", "x": x.get("field"), "x_title": x.get("title", x.get("field")),
           "y": y.get("field"), "y_title": y.get("title", y.get("field")),
           "points": len(spec.get("data", {}).get("values", []))}
    missing = [k for k in ("title", "x_title", "y_title") if not out[k]]
    if missing:
        raise TourError(f"plot {plot}: no {', '.join(missing)} in its spec (declare title, x and y in dvc.yaml)")
    return out


# --------------------------------------------------------------------------- Vega from the npm registry
def vega_script(vega_dir: Path, package: str, version: str) -> Path:
    """The file the CDN serves for `package@version` (its package.json `jsdelivr` entry), via `npm pack`."""
    dest = vega_dir / f"{package}@{version}.js"
    if dest.is_file():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise TourError("npm not found: apt-get install -y npm (it fetches Vega for the page)")
    vega_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=tmp, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0:
            raise TourError(f"npm pack {package}@{version} failed: {r.stderr.strip()[-300:]}")
        with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
            meta = json.load(tar.extractfile("package/package.json"))
            entry = meta.get("jsdelivr") or meta.get("unpkg") or meta["main"]
            member = tar.extractfile(f"package/{entry.removeprefix('./')}")
            dest.with_suffix(".tmp").write_bytes(member.read())
    dest.with_suffix(".tmp").replace(dest)
    return dest


def offline_page(page: Path, vega_dir: Path, into: Path) -> Path:
    """A copy of DVC's page folder in `into`, its CDN scripts pointing at local copies of the same versions."""
    shutil.copytree(page.parent, into, dirs_exist_ok=True)
    html = page.read_text()
    scripts = CDN_SCRIPT.findall(html)
    if not scripts:
        raise TourError(f"{page}: no Vega scripts found (did dvc change its page?)")
    for url, package, version in scripts:   # the CDN sends them as UTF-8 (Vega's minus sign); a file has no header
        html = html.replace(f'<script src="{url}">',
                            f'<script src="{vega_script(vega_dir, package, version).resolve().as_uri()}" charset="utf-8">')
    copy = into / page.name
    copy.write_text(html)
    return copy


# --------------------------------------------------------------------------- the browser
def drawn(driver, element_id: str, kind: str) -> bool:
    """Vega has drawn the plot's canvas (non-zero size, some pixel not blank); an image has loaded."""
    if kind == "image":
        return driver.execute_script(
            "const i = document.querySelector(`[id='${arguments[0]}'] img`);"
            "return !!i && i.complete && i.naturalWidth > 0;", element_id)
    return driver.execute_script("""
      const c = document.querySelector(`[id='${arguments[0]}'] canvas`);
      if (!c || !c.width || !c.height) return false;
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true;
      return false;""", element_id)


def shoot(page: Path, plots: dict[str, str], out: Path) -> dict[str, str]:
    """Open `page` and save each plot's element; plot name -> PNG path."""
    from selenium.webdriver.common.by import By

    out.mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="flexvar-chromium-"))
    driver = chromium(profile)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1600, "height": 1000, "deviceScaleFactor": SCALE, "mobile": False})
        driver.get(page.as_uri())
        shots = {}
        for plot, kind in plots.items():
            eid = div_id(plot)
            wait_for(driver, f"plot {plot} drawn", lambda: drawn(driver, eid, kind), timeout=60)
            time.sleep(0.5)
            css = f"[id='{eid}'] img" if kind == "image" else f"[id='{eid}']"   # vega-embed's own inline-block
            element = driver.find_element(By.CSS_SELECTOR, css)
            if kind == "image":   # the image with DVC's frame and the revision it came from
                element = element.find_element(By.XPATH, "..")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            path = out / shot_name(plot)
            element.screenshot(str(path))
            shots[plot] = str(path)
        return shots
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run(project: Path, out: Path, vega_dir: Path, diff: list[str] | None = None) -> dict[str, dict]:
    command = ["plots", "diff", *diff] if diff else ["plots", "show"]
    declared = json.loads(dvc(project, *command, "--json"))["data"]
    if not declared:
        raise TourError(f"{project}: dvc plots show lists no plots (run dvc repro first)")
    summary = {}
    for plot, entries in declared.items():
        entry = entries[0]
        summary[plot] = {"type": entry["type"]}
        if entry["type"] == "vega":
            summary[plot].update(describe(plot, entry["content"]))
    dvc(project, *command)
    with tempfile.TemporaryDirectory(prefix="flexvar-dvc-plots-") as tmp:
        page = offline_page(project / "dvc_plots" / "index.html", vega_dir, Path(tmp))
        shots = shoot(page, {p: s["type"] for p, s in summary.items()}, out)
    for plot, path in shots.items():
        summary[plot]["png"] = path
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."), help="project holding dvc.yaml and its plots")
    ap.add_argument("--out", type=Path, default=Path("docs/dvc_plots"), help="screenshot folder")
    ap.add_argument("--vega-dir", type=Path, default=Path(".cache/vega"), help="where Vega's scripts are kept")
    ap.add_argument("--diff", nargs="+", metavar="REV", help="draw `dvc plots diff REV...` instead of `plots show`")
    args = ap.parse_args(argv)
    problem = browser_missing()
    if problem:
        print(f"dvc_plots_shots: {problem}", file=sys.stderr)
        return 2
    try:
        summary = run(args.project.resolve(), args.out, args.vega_dir, args.diff)
    except TourError as e:
        print(f"dvc_plots_shots: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
