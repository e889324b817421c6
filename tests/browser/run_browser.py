"""Notebooks in a real browser: JupyterLab (headless, on 127.0.0.1 with a token, the project's kernel) driven by
Playwright in Debian's Chromium. `make test-browser` runs it; pytest does not collect it.

1. Installs what it needs when missing: Debian's Chromium (`apt-get install -y chromium`, as root) and Playwright
   from PyPI into the venv (pinned in requirements-browser.txt). No browser is downloaded: Playwright drives
   /usr/bin/chromium.
2. Copies the notebooks it opens into build/browser/notebooks/ with their parameters cell edited (tiny profile;
   13 without its headless demo), the project's kernel named in their metadata; figures and cached results go to
   build/browser/ too, so nothing under figures/ or data/cache/ is touched.
3. 05_certification: runs all cells, waits for the kernel to go idle, and checks that no cell shows an error, that
   the certification table is rendered and that at least one figure image is displayed (loaded, non-empty).
4. 13_explorer: runs it, checks the shown `detect` verdict with the patch in the corner, types the centre into the
   position sliders (the patch then covers the object) and checks that the shown verdict becomes what
   `scalecert.defense.detect` says for that setting (computed here, outside the browser; the image is one where
   the two verdicts differ).
5. Saves screenshots under build/browser/ and stops the server, its kernels and the browser whatever happens (every
   wait is bounded; the processes are ended by id).

Options: ``--only 05|13``; ``--break error|figure`` runs a broken copy of 05 (an error cell, or figures that never
render: ``%matplotlib agg``) to show that the checks fail; ``--cache DIR`` the notebooks' results cache (default a
fresh one in build/browser/; `make test-browser` passes nbval's build/test-cache, which `make test` has just
filled with the same tiny-profile results, so that 05 reads them instead of computing them again). The last line
counts the checks: ``browser: N passed, N failed``; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: the Makefile's KERNEL. `make setup` registers it in the user's Jupyter folder, where another checkout's `make setup`
#: may point it at that checkout's venv; the server started here sees its own copy first (JUPYTER_PATH), bound to
#: this venv
KERNEL = "scalecert"
TIMEOUT = {"server": 90, "open": 180, "run_05": 1800, "run_13": 900, "verdict": 300, "install": 1500}

PHASES: dict[str, float] = {}
CHECKS: list[tuple[str, bool, str]] = []


class Failure(Exception):
    """A step that cannot go on (the checks after it are not run)."""


def log(msg: str) -> None:
    print(f"[browser {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextmanager
def phase(name: str):
    t0 = time.perf_counter()
    log(f"{name} ...")
    try:
        yield
    finally:
        PHASES[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {PHASES[name]} s")


def check(name: str, ok: bool, detail: str = "") -> bool:
    CHECKS.append((name, bool(ok), detail))
    log(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))
    return bool(ok)


# ------------------------------------------------------------------------------------------------ installs
def ensure_chromium() -> str:
    if os.access(CHROMIUM, os.X_OK):
        return "present"
    if os.geteuid() != 0:
        raise Failure(f"{CHROMIUM} is missing and this is not root: run `apt-get install -y chromium` as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(OUT / "apt-get.log", "w") as out:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            r = subprocess.run(
                cmd, env=env, timeout=TIMEOUT["install"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
            if r.returncode:
                raise Failure(f"{' '.join(cmd)} failed ({r.returncode}); see {OUT / 'apt-get.log'}")
    if not os.access(CHROMIUM, os.X_OK):
        raise Failure(f"apt-get installed chromium but {CHROMIUM} is not there")
    return "installed"


def ensure_playwright() -> str:
    from importlib.metadata import PackageNotFoundError, version

    req = ROOT / "requirements-browser.txt"
    pins = dict(line.split("==") for line in req.read_text().split("\n") if "==" in line and not line.startswith("#"))
    try:
        if all(version(k) == v for k, v in pins.items()):
            return "present"
    except PackageNotFoundError:
        pass
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(req)],
        check=True,
        timeout=TIMEOUT["install"],
        stdin=subprocess.DEVNULL,
    )
    return "installed"


# ------------------------------------------------------------------------------------------------ notebooks
def prepare_copy(name: str, params: dict, extra_cells: list[str] = ()) -> Path:
    """Write a copy of notebooks/NAME under build/browser/notebooks with parameters set and the project's kernel."""
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    at = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c["metadata"].get("tags", []))
    src = "".join(nb["cells"][at]["source"])
    for k, v in params.items():
        src, n = re.subn(
            rf"^{k} = .*?(\s+#.*)?$", lambda m, k=k, v=v: f"{k} = {v!r}" + (m.group(1) or ""), src, count=1, flags=re.M
        )
        if n != 1:
            raise Failure(f"{name}: no parameter {k!r} in its parameters cell")
    nb["cells"][at]["source"] = src
    for j, code in enumerate(extra_cells):
        nb["cells"].insert(
            at + 1 + j,
            {
                "cell_type": "code",
                "execution_count": None,
                "metadata": {},
                "outputs": [],
                "source": code,
                "id": f"broken{j}",
            },
        )
    nb["metadata"]["kernelspec"] = {"name": KERNEL, "display_name": "Python (scalecert)", "language": "python"}
    path = OUT / "notebooks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ the server
def descendants(pid: int) -> list[int]:
    """Return the ids of every live descendant of a process (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


class Lab:
    """JupyterLab on 127.0.0.1 with a token, its state under build/browser/."""

    def __init__(self, root_dir: Path, env: dict):
        self.token = secrets.token_hex(24)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.root_dir, self.env, self.proc, self.seen = root_dir, env, None, set()

    def start(self) -> None:
        settings = OUT / "lab-settings"
        for path, value in (
            (
                settings / "@jupyterlab/notebook-extension/tracker.jupyterlab-settings",
                {"windowingMode": "none"},
            ),  # every cell in the page, so that its outputs can be checked
            (
                settings / "@jupyterlab/apputils-extension/notification.jupyterlab-settings",
                {"checkForUpdates": False, "fetchNews": "false", "doNotDisturbMode": True},
            ),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        venv_bin = Path(sys.executable).parent
        cmd = [
            str(venv_bin / "jupyter"),
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={OUT / 'lab-workspaces'}",
            "--LabApp.extension_manager=readonly",
            "--ServerApp.terminals_enabled=False",
        ] + (["--allow-root"] if os.geteuid() == 0 else [])
        self.log = open(OUT / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.root_dir,
            process_group=0,
        )
        deadline = time.monotonic() + TIMEOUT["server"]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"JupyterLab exited ({self.proc.returncode}); see {OUT / 'jupyterlab.log'}")
            try:
                self.api("GET", "/api/status", timeout=3)
                return
            except OSError:
                time.sleep(0.5)
        raise Failure(f"JupyterLab did not answer within {TIMEOUT['server']} s")

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(
            self.url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def kernels(self) -> list[dict]:
        """Return the server's kernels (id, name, execution_state)."""
        return self.api("GET", "/api/kernels")

    def shutdown_kernels(self) -> None:
        """Shut every kernel down (one notebook at a time keeps the CPU for it)."""
        for k in self.kernels():
            self.api("DELETE", f"/api/kernels/{k['id']}", timeout=30)

    def remember_children(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.seen.update(descendants(self.proc.pid))

    def stop(self) -> list[int]:
        """Stop the server and every process it started; return the ids still alive afterwards (none expected)."""
        if self.proc is None:
            return []
        self.remember_children()
        if self.proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=10)  # shuts the kernels down too
            except OSError as e:
                log(f"shutdown request failed ({e}); terminating")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # kernels run in process groups of their own: end them by id
            left = [p for p in sorted(self.seen) if alive(p)]
            for p in left:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = [p for p in left if alive(p)]
            if not left:
                break
        self.log.close()
        return [p for p in sorted(self.seen) if alive(p)]


# ------------------------------------------------------------------------------------------------ in the page
STATE_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const code = w.content.widgets.filter(c => c.model.type === 'code');
  let errors = 0;
  for (const c of code) {
    const o = c.model.outputs;
    for (let i = 0; i < o.length; i++) if (o.get(i).type === 'error') errors++;
  }
  const prompt = c => (c.node.querySelector('.jp-InputPrompt') || {textContent: ''}).textContent;
  return {pending: code.filter(c => prompt(c).includes('*')).length,
          executed: code.filter(c => c.model.executionCount !== null).length, total: code.length, errors};
}"""


def kernel_state(lab: Lab) -> tuple[str, str | None]:
    """Return (execution state, kernel name) of the one kernel running ('none' if there is none)."""
    ks = lab.kernels()
    if len(ks) != 1:
        return ("none" if not ks else f"{len(ks)} kernels"), None
    return ks[0]["execution_state"], ks[0]["name"]


def open_notebook(page, lab: Lab, name: str) -> dict:
    """Open a notebook, wait for its kernel to be idle and the page to show it; return the page's state and the
    kernel's name."""
    # a workspace of its own per notebook: only this notebook is open in the page
    workspace = re.sub(r"\W", "", name.split("_")[0])
    page.goto(
        f"{lab.url}/lab/workspaces/nb{workspace}/tree/{name}?reset&token={lab.token}",
        wait_until="domcontentloaded",
        timeout=TIMEOUT["open"] * 1000,
    )
    page.wait_for_function(
        "name => { const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
        " return !!(w && w.context && w.context.path.endsWith(name) && w.content); }",
        arg=name,
        timeout=TIMEOUT["open"] * 1000,
    )
    page.evaluate("async () => { await window.jupyterapp.shell.currentWidget.context.ready; }")
    page.wait_for_function(  # the notebook's toolbar shows the kernel connected and idle
        "() => { const w = window.jupyterapp.shell.currentWidget;"
        " const e = w.node.querySelector('.jp-Notebook-ExecutionIndicator');"
        " return !!(e && e.dataset.status === 'idle'); }",
        timeout=TIMEOUT["open"] * 1000,
    )
    deadline = time.monotonic() + TIMEOUT["open"]
    while kernel_state(lab)[0] != "idle" and time.monotonic() < deadline:
        time.sleep(1)
    lab.remember_children()
    return dict(page.evaluate(STATE_JS), kernel_name=kernel_state(lab)[1])


def run_all(page, lab: Lab, timeout: float) -> dict:
    """Run every cell (Run > Run All Cells) and wait until the kernel is idle with no cell queued: every cell ran,
    or the run stopped at a cell that failed (the cells after it are then not run)."""
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    t0 = time.monotonic()
    deadline, stable, last_log, st, started = t0 + timeout, 0, 0.0, {}, False
    while time.monotonic() < deadline:
        time.sleep(2)
        lab.remember_children()
        st = dict(page.evaluate(STATE_JS), kernel=kernel_state(lab)[0])
        if st["kernel"] not in ("idle", "busy", "starting"):
            raise Failure(f"kernel {st['kernel']}")
        started = started or st["pending"] > 0 or st["kernel"] != "idle" or st["executed"] > 0
        done = (started or time.monotonic() - t0 > 20) and st["kernel"] == "idle" and st["pending"] == 0
        stable = stable + 1 if done else 0
        if stable >= 3:
            return st
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            log(f"  {st['executed']}/{st['total']} cells run, kernel {st['kernel']}")
    raise Failure(f"the notebook did not finish within {timeout} s (last state {st})")


def error_outputs(page) -> list[str]:
    """Return the texts of error outputs shown in the page (tracebacks rendered as stderr)."""
    texts = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    return [t[:300] for t in texts if "Traceback" in t or re.search(r"^\w*(Error|Exception)\b", t, re.M)]


def loaded_images(page, selector: str) -> list:
    """Return the locators of the images matched that are loaded and non-empty once scrolled into view."""
    out = []
    imgs = page.locator(selector)
    for i in range(min(imgs.count(), 20)):
        img = imgs.nth(i)
        img.scroll_into_view_if_needed(timeout=10000)
        try:
            img.wait_for(state="visible", timeout=10000)
            ok = img.evaluate("el => el.complete && el.naturalWidth > 0 && el.naturalHeight > 0")
        except Exception:  # noqa: BLE001 - an image that never shows counts as not displayed
            ok = False
        if ok:
            out.append(img)
    return out


def check_05(page, lab: Lab, tag: str) -> None:
    st = open_notebook(page, lab, "05_certification.ipynb")
    check(f"05{tag} runs in the project's kernel", st["kernel_name"] == KERNEL, f"kernel {st['kernel_name']}")
    with phase(f"05{tag}: run all cells (tiny profile)"):
        st = run_all(page, lab, TIMEOUT["run_05"])
    shown = error_outputs(page)
    check(
        f"05{tag}: no cell shows an error",
        st["errors"] == 0 and not shown,
        f"{st['errors']} error outputs in the model; shown: {shown[:2]}",
    )
    check(f"05{tag}: every code cell ran", st["executed"] == st["total"], f"{st['executed']}/{st['total']}")
    table = page.locator(".jp-OutputArea-output", has_text="Table 2 (")
    ok = table.count() >= 1
    if ok:
        table.first.evaluate("el => el.scrollIntoView({block: 'start'})")
        text = table.first.inner_text()
        ok = table.first.is_visible() and "certified" in text and "ScaleCert" in text
        page.screenshot(path=str(OUT / f"05{tag}_table.png"))
    check(f"05{tag}: the certification table is rendered", ok)
    imgs = loaded_images(page, ".jp-OutputArea-output img")
    if imgs:
        imgs[0].screenshot(path=str(OUT / f"05{tag}_figure.png"))
    check(f"05{tag}: at least one figure image is displayed", len(imgs) >= 1, f"{len(imgs)} loaded images")
    page.screenshot(path=str(OUT / f"05{tag}_certification.png"))


def expected_verdicts(image_candidates: list[int], patch_pct: float) -> tuple[int, dict]:
    """Return an image whose detect verdict differs between the patch in the corner and at the centre, with both
    verdicts as the explorer words them ("detect: ALERT" or "detect: CLASS (k)"), from scalecert.defense.detect."""
    import torch

    from scalecert import attacks as T
    from scalecert import data as D
    from scalecert import experiments as E
    from scalecert import notebook as N
    from scalecert.defense import detect
    from scalecert.windows import patch_pixels

    name = "cifar10"
    model = E.load_model(E.model_name(name, 1, E.DEFAULT_RATE[name]))
    patch = E.cached_universal_patch(
        name, E.model_name(name), patch_pct, T.UNIVERSAL_TARGET[name], steps=N.patch_steps("tiny"), seed=0
    )
    ds = D.load_dataset(name, "eval")
    n = D.image_size(name)
    c = (n - patch_pixels(patch_pct, n)) // 2
    for i in image_candidates:
        x, _ = ds.tensors([i])
        words = {}
        for where, corner in (("corner", (0, 0)), ("centre", (c, c))):
            xp = T.apply_patch(x, patch, torch.tensor([corner]))
            rec = detect(model, xp, patch_pct, mode="sound", rule="strict", tau=E.DEFAULT_TAU[name], r=3).iloc[0]
            out = int(rec.output)
            words[where] = "detect: ALERT" if rec.alert else f"detect: {ds.classes[out]} ({out})"
        log(f"  image {i}: {words}")
        if words["corner"] != words["centre"]:
            return i, dict(words, centre_position=c)
    raise Failure(f"detect gives the same verdict in the corner and at the centre for images {image_candidates}")


def verdict(page) -> str:
    return page.locator(".scalecert-verdict").first.inner_text().strip().split("\n")[0]


def set_slider(page, cls: str, value: int) -> None:
    """Type a value into an IntSlider's readout (its own text field) and press Enter, as a reader would."""
    readout = page.locator(f".{cls} .widget-readout").first
    readout.scroll_into_view_if_needed(timeout=10000)
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")


def check_13(page, lab: Lab, image: int, words: dict) -> None:
    st = open_notebook(page, lab, "13_explorer.ipynb")
    check("13 runs in the project's kernel", st["kernel_name"] == KERNEL, f"kernel {st['kernel_name']}")
    with phase("13: run all cells (tiny profile, widgets only)"):
        st = run_all(page, lab, TIMEOUT["run_13"])
    shown = error_outputs(page)
    check(
        "13: no cell shows an error",
        st["errors"] == 0 and not shown and st["executed"] == st["total"],
        f"{st['errors']} errors, {st['executed']}/{st['total']} cells; shown: {shown[:2]}",
    )
    box = page.locator(".scalecert-verdict").first
    try:
        box.wait_for(state="visible", timeout=60000)
    except Exception:  # noqa: BLE001
        check("13: the explorer's widgets are shown", False)
        return
    panel = page.locator(".jp-OutputArea-output", has=page.locator(".scalecert-verdict")).first
    panel.scroll_into_view_if_needed(timeout=10000)
    check("13: the explorer's figure is displayed", len(loaded_images(page, "img.scalecert-figure")) == 1)
    first = verdict(page)
    check(
        "13: corner verdict is detect's",
        first.startswith(words["corner"] + ","),
        f"shown {first!r}, detect {words['corner']!r} (image {image})",
    )
    panel.screenshot(path=str(OUT / "13_explorer_corner.png"))
    c = words["centre_position"]
    t0 = time.perf_counter()
    set_slider(page, "scalecert-row", c)
    set_slider(page, "scalecert-col", c)
    deadline, shown = time.monotonic() + TIMEOUT["verdict"], ""
    while time.monotonic() < deadline:
        shown = verdict(page)
        status = page.locator(".scalecert-status").first.inner_text()
        if status.startswith("updated") and f"patch at ({c}, {c})" in status:
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    check(
        "13: moving the patch onto the object changes the verdict as detect says",
        shown.startswith(words["centre"] + ",") and not shown.startswith(words["corner"] + ","),
        f"shown {shown!r}, detect {words['centre']!r} at ({c}, {c}); two slider moves re-rendered in {seconds:.1f} s",
    )
    PHASES["13: two slider moves until the verdict shows"] = round(seconds, 1)
    panel.screenshot(path=str(OUT / "13_explorer_centre.png"))
    page.screenshot(path=str(OUT / "13_explorer_page.png"))


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["05", "13"], help="open one notebook only")
    ap.add_argument(
        "--break",
        dest="broken",
        choices=["error", "figure"],
        help="run a deliberately broken copy of 05 (its checks must fail)",
    )
    ap.add_argument("--total-timeout", type=int, default=3600, help="seconds before everything is stopped")
    ap.add_argument(
        "--cache",
        type=Path,
        default=OUT / "cache",
        help="SCALECERT_CACHE_DIR of the notebooks (default: a fresh one under build/browser/)",
    )
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    env = dict(
        os.environ,
        SCALECERT_FIG_DIR=str(OUT / "figures"),
        SCALECERT_CACHE_DIR=str(args.cache.resolve()),
        JUPYTER_RUNTIME_DIR=str(OUT / "runtime"),
        JUPYTER_PATH=str(OUT / "kernel" / "share" / "jupyter"),
    )
    log(f"results cache: {env['SCALECERT_CACHE_DIR']}")
    os.environ.update({k: env[k] for k in ("SCALECERT_FIG_DIR", "SCALECERT_CACHE_DIR")})  # before scalecert imports

    def on_alarm(signum, frame):
        raise Failure(f"the whole run took more than {args.total_timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.total_timeout)
    lab, left = None, []
    try:
        with phase("install Chromium (Debian) if missing"):
            log(f"  chromium: {ensure_chromium()}")
        with phase("install Playwright (PyPI) if missing"):
            log(f"  playwright: {ensure_playwright()}")
        broken = {
            "error": ['raise RuntimeError("a deliberately broken copy (run_browser.py --break error)")'],
            "figure": ["# a deliberately broken copy: figures never render\n%matplotlib agg"],
        }
        broken = broken.get(args.broken, [])
        todo = ["05"] if args.broken else ([args.only] if args.only else ["05", "13"])
        if "05" in todo:
            prepare_copy("05_certification.ipynb", {"profile": "tiny"}, broken)
        if "13" in todo:
            with phase("13: detect's verdicts for the setting (outside the browser)"):
                nb = json.loads((ROOT / "notebooks" / "13_explorer.ipynb").read_text())
                cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
                params = "".join(cell["source"])
                default = int(re.search(r'"cifar10": (\d+)', params).group(1))
                image, words = expected_verdicts([default, 4, 9001, 9002, 9003], 5.0)
            prepare_copy(
                "13_explorer.ipynb",
                {"profile": "tiny", "demo": 0, "datasets": ["cifar10"], "images": {"cifar10": image}, "patch_pct": 5.0},
            )
        with phase("start JupyterLab"):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ipykernel",
                    "install",
                    "--prefix",
                    str(OUT / "kernel"),
                    "--name",
                    KERNEL,
                    "--display-name",
                    "Python (scalecert)",
                ],
                check=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            lab = Lab(OUT / "notebooks", env)
            lab.start()
            specs = lab.api("GET", "/api/kernelspecs")["kernelspecs"]
            argv0 = specs.get(KERNEL, {}).get("spec", {}).get("argv", [""])[0]
            ours = bool(argv0) and Path(argv0).resolve() == Path(sys.executable).resolve()
            if not check(
                "the project's kernel runs this venv's Python",
                ours,
                f"{KERNEL}: {argv0 or 'missing'}",
            ):
                raise Failure("no project kernel")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            with phase("launch Chromium"):
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60000)
            page = None

            def new_page():
                p = browser.new_page(viewport={"width": 1500, "height": 1000})
                p.set_default_timeout(60000)
                p.on("pageerror", lambda e: log(f"  page error: {e}"))
                return p

            try:
                if "05" in todo:
                    page = new_page()
                    check_05(page, lab, f"_broken_{args.broken}" if args.broken else "")
                    page.close()  # then its kernel: one notebook at a time keeps the CPU for it
                    lab.shutdown_kernels()
                if "13" in todo:
                    page = new_page()
                    check_13(page, lab, image, words)
            except Exception:
                if page is not None and not page.is_closed():
                    page.screenshot(path=str(OUT / "failure.png"))
                    log(f"  the page when it failed: {OUT / 'failure.png'}")
                raise
            finally:
                browser.close()
    except Failure as e:
        check("the run went to its end", False, str(e))
    except Exception as e:  # noqa: BLE001 - any other error is a failed run, reported, after the cleanup below
        check("the run went to its end", False, f"{type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        if lab is not None:
            with phase("stop JupyterLab and its kernels"):
                left = lab.stop()
    check("no process left behind", not left, f"still alive: {left}" if left else "server, kernels and browser ended")
    PHASES["total"] = round(time.perf_counter() - t_start, 1)
    log("seconds per phase: " + json.dumps(PHASES))
    log(f"screenshots: {sorted(p.name for p in OUT.glob('*.png'))} in {OUT}")
    failed = [c for c in CHECKS if not c[1]]
    for name, _, detail in failed:
        log(f"failed: {name}" + (f" ({detail})" if detail else ""))
    print(f"browser: {len(CHECKS) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
