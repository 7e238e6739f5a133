"""A real Airflow 3 deployment on 127.0.0.1: api-server, scheduler and dag-processor as processes.

What ``airflow dags test`` skips is exactly what a deployment depends on: the scheduler creating
runs from the schedule, the LocalExecutor handing task instances to supervised workers, and those
workers talking to the API server's execution API. ``AirflowCluster`` runs all of it with a given
environment (``devkit.stack.airflow_env`` plus a PostgreSQL metadata database), each process in
its own process group with its output in a log file, and stops every process it started.

REST calls go to the public API; ``[core] simple_auth_manager_all_admins`` (set here) makes every
request an admin, so no token dance is needed on a throwaway deployment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow_embedding_provider.devkit.embedded_postgres import free_port
from airflow_embedding_provider.devkit.stack import airflow

COMPONENTS = ("api-server", "scheduler", "dag-processor")
TERMINAL_STATES = frozenset({"success", "failed"})


class AirflowCluster:
    """``airflow api-server``, ``scheduler`` and ``dag-processor`` with LocalExecutor.

    :param env: base environment (``AIRFLOW_HOME``, ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``,
        connections, DAG folder); the cluster adds executor, API and auth settings.
    :param log_dir: where ``<component>.log`` files go.
    :param parallelism: LocalExecutor worker slots; small, since every slot is a process.
    """

    def __init__(
        self, env: Mapping[str, str], *, log_dir: Path, api_port: int | None = None, parallelism: int = 4
    ) -> None:
        self.api_port = api_port or free_port()
        self.log_dir = Path(log_dir)
        self.env = dict(env)
        self.env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                # Task workers find the execution API here (its default is localhost:8080).
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__API__WORKERS": "1",  # one uvicorn worker: a 2-core box runs everything else too
                # The scheduler signs task tokens that the API server checks: one secret for both.
                "AIRFLOW__API_AUTH__JWT_SECRET": self.env.get("AIRFLOW__API_AUTH__JWT_SECRET")
                or secrets.token_urlsafe(32),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                # Pick up the DAG files promptly; the defaults suit a long-lived deployment.
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    # -- processes ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """``airflow db migrate``: create the metadata schema (run once, before ``start``)."""
        Path(self.env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
        airflow(["db", "migrate"], self.env)

    def _args(self, component: str) -> list[str]:
        if component == "api-server":
            return ["--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        return []

    def _spawn(self, component: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        airflow_bin = str(Path(sys.executable).with_name("airflow"))
        with open(self.log_path(component), "ab") as log:
            # Own process group: stopping it reaches the workers and supervisors it forks.
            self.procs[component] = subprocess.Popen(
                [airflow_bin, component, *self._args(component)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self, *, timeout: float = 240) -> AirflowCluster:
        """Start the three processes and wait until the API server answers its health check."""
        for component in COMPONENTS:
            self._spawn(component)
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(OSError, ValueError):
                if self.request("GET", "/api/v2/monitor/health", timeout=5) is not None:
                    return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API server at {self.base_url} was not healthy after {timeout:g} s")
            time.sleep(1)

    def restart(self, component: str, env: Mapping[str, str]) -> None:
        """Stop one component and start it again with ``env`` added to the environment.

        DAG files read settings such as ``RECRUIT_EMBEDDING_SCHEDULE`` when parsed, so a new value
        needs a new ``dag-processor``; the others keep running.
        """
        _stop_groups([self.procs.pop(component)])
        self.env.update(env)
        self._spawn(component)

    def check_alive(self) -> None:
        """Raise if a component exited: a dead scheduler would otherwise look like a slow run."""
        for component, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {component} exited with {proc.returncode}; see {self.log_path(component)}")

    def stop(self, *, grace: float = 20) -> None:
        """SIGTERM each process group, then SIGKILL what is still there after ``grace`` seconds."""
        procs, self.procs = list(self.procs.values()), {}
        _stop_groups(procs, grace=grace)

    def __enter__(self) -> AirflowCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tails(self, lines: int = 60) -> str:
        """The last ``lines`` of every component's log, for a failure message."""
        parts = []
        for component in COMPONENTS:
            path = self.log_path(component)
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
            parts.append(f"----- {path} -----\n" + "\n".join(text))
        return "\n".join(parts)

    # -- REST API ----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> Any:
        """One call to the API server; the decoded JSON answer (``None`` when empty)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:2000]!r}") from exc
        return json.loads(raw) if raw else None

    def wait_for_dag(self, dag_id: str, *, timeout: float = 240) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id`` into the metadata database."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(RuntimeError, OSError):
                dag: dict[str, Any] = self.request("GET", f"/api/v2/dags/{dag_id}")
                return dag
            if time.monotonic() > deadline:
                raise TimeoutError(f"DAG {dag_id} was not parsed after {timeout:g} s")
            time.sleep(2)

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": paused})

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        """Trigger a manual run through the REST API; its ``dag_run_id``."""
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": dict(conf or {})})
        return str(run["dag_run_id"])

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
        return runs

    def wait_for_run(
        self, dag_id: str, *, run_id: str | None = None, run_type: str | None = None, timeout: float = 600
    ) -> dict[str, Any]:
        """Wait until the run ``run_id`` (or the first run of ``run_type``) ends; that run.

        Raises when it failed, with the task states, so a failure says where it broke.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            run = next(
                (
                    r
                    for r in self.runs(dag_id)
                    if (run_id is None or r["dag_run_id"] == run_id) and (run_type is None or r["run_type"] == run_type)
                ),
                None,
            )
            if run is not None and run["state"] in TERMINAL_STATES:
                if run["state"] != "success":
                    raise RuntimeError(f"run {run['dag_run_id']} of {dag_id} {run['state']}: {self.task_states(run)}")
                return run
            if time.monotonic() > deadline:
                state = "not created" if run is None else f"{run['state']}: {self.task_states(run)}"
                raise TimeoutError(f"{dag_id} run {run_id or run_type} not finished after {timeout:g} s ({state})")
            time.sleep(2)

    def task_instances(self, run: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every task instance of ``run`` as the REST API gives it (state, try_number, ...)."""
        answer: dict[str, Any] = self.request("GET", _run_path(run) + "/taskInstances")
        return list(answer["task_instances"])

    def task_states(self, run: Mapping[str, Any]) -> dict[str, str | None]:
        """``task_id[map_index]`` -> state for every task instance of ``run``."""
        return {
            f"{ti['task_id']}" + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""): ti["state"]
            for ti in self.task_instances(run)
        }

    def xcom(self, run: Mapping[str, Any], task_id: str, key: str = "return_value") -> Any:
        """A task's XCom value in ``run`` (an unmapped task's), as stored."""
        return self.request("GET", _run_path(run) + f"/taskInstances/{task_id}/xcomEntries/{key}")["value"]


def _run_path(run: Mapping[str, Any]) -> str:
    # Run ids hold ':' and '+' (manual__2025-01-01T00:00:00+00:00): quote them whole.
    return f"/api/v2/dags/{run['dag_id']}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"


def _stop_groups(procs: Sequence[subprocess.Popen[bytes]], *, grace: float = 20) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        # The group can outlive its leader (an orphaned task supervisor): kill what is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
