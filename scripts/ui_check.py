"""``make ui-check``: the provider's connection forms in Airflow's real UI, in headless Chromium.

Starts a throwaway Airflow ``api-server`` (SQLite, every request an admin, connection testing
enabled), the reference API server (``CacheService``) and an AI server over a small sample, then
drives Debian's ``chromium`` through Selenium and its ``chromium-driver``:

1. *Add Connection* -> type *Embedding gRPC*: every field is there with its label, the token is a
   password field, the port placeholder is the AI server's; a screenshot of each section.
2. The same for *Embedding cache invalidation gRPC*, whose port placeholder is the API server's;
   then the form is filled in and saved as ``cache_grpc_default``.
3. On the connection list, *Test* of each connection: green for the AI server's and the API
   server's connection, red with a message naming the type for an API server connection saved
   with the AI server's type.

Prints one line a check and the screenshot paths; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_embedding_provider.get_provider_info import get_provider_info  # noqa: E402
from airflow_embedding_provider.hooks.grpc_base import GrpcServiceHook  # noqa: E402
from airflow_embedding_provider.hooks.grpc_cache import GrpcCacheHook  # noqa: E402
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook  # noqa: E402
from dev.sample import write_sample  # noqa: E402
from dev.stack import ServerProcess, airflow, free_port  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
#: Chromium as root in a container: no sandbox, and nothing that would reach the network.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1600",
)
UI_TIMEOUT = 30.0
#: Extra field -> its input's ``type`` in the form (``format: password`` must become ``password``).
INPUT_TYPES = {"use_tls": "checkbox", "token": "password"}


class CheckFailedError(AssertionError):
    pass


class Report:
    def __init__(self) -> None:
        self.failures = 0

    def check(self, ok: bool, what: str) -> None:
        print(("ok     " if ok else "FAILED ") + what, flush=True)
        self.failures += not ok


def _wait(predicate: Callable[[], Any], what: str, timeout: float = UI_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise CheckFailedError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.25)


class AirflowUI:
    """``airflow api-server`` on 127.0.0.1 with a throwaway home; its REST API for set-up."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
        dags = home / "dags"
        dags.mkdir(parents=True, exist_ok=True)
        self.env.update(
            {
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                # The Test button is off by default in Airflow 3.
                "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            }
        )
        self.log = home / "api-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AirflowUI:
        airflow(["db", "migrate"], self.env)
        airflow_bin = str(Path(sys.executable).with_name("airflow"))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [airflow_bin, "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"api-server exited; see {self.log}"
            with urllib.request.urlopen(self.url + "/api/v2/monitor/health", timeout=5):
                return True

        _wait(healthy, "the api-server", timeout=180)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)

    def add_connection(self, conn_id: str, conn_type: str, target: str) -> None:
        host, port = target.rsplit(":", 1)
        body = {"connection_id": conn_id, "conn_type": conn_type, "host": host, "port": int(port)}
        req = urllib.request.Request(
            self.url + "/api/v2/connections",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30):
            pass

    def connection(self, conn_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + f"/api/v2/connections/{conn_id}", timeout=30) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
        return answer


@contextlib.contextmanager
def browser(profile: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _by() -> Any:
    from selenium.webdriver.common.by import By

    return By


def _button(driver: Any, text: str) -> Any:
    return _wait(
        lambda: next(b for b in driver.find_elements(_by().TAG_NAME, "button") if b.text.strip() == text),
        f"the button {text!r}",
    )


def _click(driver: Any, element: Any) -> None:
    # Tooltips of neighbouring buttons may cover the element; a script click goes through.
    driver.execute_script("arguments[0].click()", element)


def _field(driver: Any, label: str, name: str) -> Any:
    """The input named ``name`` inside the same form field as a visible label reading ``label``.

    The label and the input are matched through their common form field, not through the
    label's ``for``: Airflow's form does not tie every extra field's label to its input that way.
    """
    xpath = (
        f"//label[normalize-space(string(.))={json.dumps(label)} or "
        f"normalize-space(string(.))={json.dumps(label + ' *')}]"
        f"/ancestor::*[.//*[@name={json.dumps(name)}]][1]//*[@name={json.dumps(name)}]"
    )
    return _wait(
        lambda: next(e for e in driver.find_elements(_by().XPATH, xpath) if e.is_displayed() or name == "use_tls"),
        f"the field {label!r} ({name})",
        timeout=10,
    )


def _open_add_form(driver: Any, ui: AirflowUI, type_label: str) -> None:
    driver.get(ui.url + "/connections")
    _click(driver, _button(driver, "Add Connection"))
    label = _wait(
        lambda: next(
            lab for lab in driver.find_elements(_by().TAG_NAME, "label") if lab.text.startswith("Connection Type")
        ),
        "the Connection Type field",
    )
    select = driver.find_element(_by().ID, label.get_attribute("for"))

    def typed() -> bool:  # the dialog may still be opening: retried until it takes the keys
        select.click()
        select.send_keys(type_label.split()[0])
        return True

    _wait(typed, "the Connection Type field to take input")
    option = _wait(
        lambda: next(
            o for o in driver.find_elements(_by().CSS_SELECTOR, "[role=option]") if o.text.strip() == type_label
        ),
        f"the option {type_label!r}",
    )
    option.click()
    _button(driver, "Standard Fields")


def _expand(driver: Any, section: str) -> None:
    button = _button(driver, section)
    if button.get_attribute("aria-expanded") != "true":
        button.click()  # a real click: the accordion ignores a scripted one
        # The accordion renders its button anew: look it up again.
        _wait(
            lambda: _button(driver, section).get_attribute("aria-expanded") == "true", f"the {section} section to open"
        )
        time.sleep(0.5)  # the section's opening animation


def check_form(driver: Any, ui: AirflowUI, hook: type[GrpcServiceHook], out: Path, report: Report) -> list[Path]:
    """Every field of ``hook``'s connection type with its label; screenshots of both sections."""
    info = next(c for c in get_provider_info()["connection-types"] if c["connection-type"] == hook.conn_type)
    behaviour = info["ui-field-behaviour"]
    _open_add_form(driver, ui, info["hook-name"])
    shots = []
    _expand(driver, "Standard Fields")
    host_label = behaviour["relabeling"]["host"]
    host = _field(driver, host_label, "host")
    report.check(
        host.get_attribute("placeholder") == behaviour["placeholders"]["host"],
        f"{hook.conn_type}: {host_label!r} with its placeholder",
    )
    port = _field(driver, "Port", "port")
    placeholder = port.get_attribute("placeholder")
    report.check(
        placeholder == str(hook.default_port),
        f"{hook.conn_type}: 'Port' placeholder {placeholder} (its server's port {hook.default_port})",
    )
    for hidden in behaviour["hidden-fields"]:
        present = [e for e in driver.find_elements(_by().NAME, hidden) if e.is_displayed()]
        report.check(not present, f"{hook.conn_type}: no {hidden!r} field (hidden)")
    shots.append(out / f"{hook.conn_type}-standard-fields.png")
    driver.save_screenshot(str(shots[-1]))
    _expand(driver, "Extra Fields")
    for name, spec in info["conn-fields"].items():
        element = _field(driver, spec["label"], f"element_{name}")
        kind = element.get_attribute("type")
        expected = INPUT_TYPES.get(name, "text")
        report.check(kind == expected, f"{hook.conn_type}: {spec['label']!r} is a {kind} field (expected {expected})")
    shots.append(out / f"{hook.conn_type}-extra-fields.png")
    driver.save_screenshot(str(shots[-1]))
    return shots


def save_through_form(driver: Any, ui: AirflowUI, conn_id: str, target: str, report: Report) -> None:
    """Fill in and save a cache connection with the form, as a user would."""
    info = next(c for c in get_provider_info()["connection-types"] if c["connection-type"] == GrpcCacheHook.conn_type)
    _open_add_form(driver, ui, info["hook-name"])
    host, port = target.rsplit(":", 1)
    _field(driver, "Connection ID", "connection_id").send_keys(conn_id)
    _expand(driver, "Standard Fields")
    _field(driver, info["ui-field-behaviour"]["relabeling"]["host"], "host").send_keys(host)
    _field(driver, "Port", "port").send_keys(port)
    _click(driver, _button(driver, "Save"))

    def saved() -> dict[str, Any]:
        return ui.connection(conn_id)

    conn = _wait(saved, f"the connection {conn_id} to be saved")
    report.check(
        (conn["conn_type"], conn["host"], conn["port"]) == (GrpcCacheHook.conn_type, host, int(port)),
        f"saved {conn_id} through the form: {conn['conn_type']} {conn['host']}:{conn['port']}",
    )


def check_test_buttons(driver: Any, ui: AirflowUI, expected: dict[str, bool], out: Path, report: Report) -> Path:
    """Click *Test* on each listed connection; the icon turns green or red, a failure shows a toast."""
    driver.get(ui.url + "/connections")
    for conn_id, ok in expected.items():

        def row_of(conn_id: str = conn_id) -> Any:
            return next(r for r in driver.find_elements(_by().CSS_SELECTOR, "tbody tr") if r.text.split()[0] == conn_id)

        row = _wait(row_of, f"the row of {conn_id}")
        button = row.find_element(_by().CSS_SELECTOR, "button[aria-label='Test Connection']")
        _click(driver, button)

        def colour(button: Any = button) -> str | None:
            html = button.get_attribute("innerHTML")
            return "green" if 'color="green"' in html else "red" if 'color="red"' in html else None

        result = _wait(colour, f"the test result of {conn_id}")
        toasts = " | ".join(t.text for t in driver.find_elements(_by().CSS_SELECTOR, "[data-part=description]"))
        report.check(
            (result == "green") == ok,
            f"Test {conn_id}: {result}" + (f" ({toasts})" if toasts and result == "red" else ""),
        )
    shot = out / "connection-list-tested.png"
    driver.save_screenshot(str(shot))
    return shot


def run(out: Path) -> int:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            print(f"ui-check: {path} is missing: apt-get install -y chromium chromium-driver", file=sys.stderr)
            return 1
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="ui-check-") as tmp:
        work = Path(tmp)
        sample = write_sample(work / "sample.pkl", 20)
        ai = ServerProcess(["ai-server", "--pkl", str(sample)], log_path=work / "ai.log")
        cache = ServerProcess(["api-server"], log_path=work / "cache.log")
        with ai, cache, AirflowUI(work / "airflow-home") as ui, browser(work / "chromium-profile") as driver:
            print(f"api-server at {ui.url}; AI server {ai.target}; API server {cache.target}", flush=True)
            shots = check_form(driver, ui, GrpcEmbeddingHook, out, report)
            shots += check_form(driver, ui, GrpcCacheHook, out, report)
            save_through_form(driver, ui, GrpcCacheHook.default_conn_name, cache.target, report)
            ui.add_connection(GrpcEmbeddingHook.default_conn_name, GrpcEmbeddingHook.conn_type, ai.target)
            # The situation of the report that started this check: the API server behind the AI server's type.
            ui.add_connection("cache_grpc_as_embedding_type", GrpcEmbeddingHook.conn_type, cache.target)
            shots.append(
                check_test_buttons(
                    driver,
                    ui,
                    {
                        GrpcCacheHook.default_conn_name: True,
                        GrpcEmbeddingHook.default_conn_name: True,
                        "cache_grpc_as_embedding_type": False,
                    },
                    out,
                    report,
                )
            )
    for shot in shots:
        print(f"screenshot: {shot}")
    print("ui-check: " + ("all checks passed" if not report.failures else f"{report.failures} check(s) FAILED"))
    return 1 if report.failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".ui-check", help="where the screenshots go")
    args = parser.parse_args()
    try:
        return run(args.out.resolve())
    except CheckFailedError as exc:
        print(f"ui-check: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
