"""A real Airflow 3 deployment on 127.0.0.1: api-server, scheduler and dag-processor as processes.

What ``airflow dags test`` skips is exactly what a deployment depends on: the scheduler creating
runs from the schedule, the executor handing task instances to supervised workers, and those
workers talking to the API server's execution API. ``AirflowCluster`` runs all of it with a given
environment (``dev.stack.airflow_env`` plus a PostgreSQL metadata database), each process in
its own process group with its output in a log file, and stops every process it started.

With ``executor="CeleryExecutor"`` (a Redis broker, Celery's result backend on the metadata
database) the tasks run on ``airflow celery worker`` processes that :meth:`AirflowCluster.start_workers`
starts, each under its own name; task instances record that name as their ``hostname`` (through
:func:`worker_hostname`), so a test can tell which worker ran what on one machine.

REST calls go to the public API; ``[core] simple_auth_manager_all_admins`` (set here) makes every
request an admin, so no token dance is needed on a throwaway deployment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from dev.stack import airflow, free_port

COMPONENTS = ("api-server", "scheduler", "dag-processor")
TERMINAL_STATES = frozenset({"success", "failed"})
EXECUTORS = ("LocalExecutor", "CeleryExecutor")
#: Environment variable that names a Celery worker; :func:`worker_hostname` reads it.
WORKER_NAME_ENV = "EMBEDDING_DEVKIT_WORKER_NAME"
#: The Celery settings the cluster test proves, and docker-compose.yaml's celery profile repeats
#: (tests/unit/test_docker_compose.py compares them). Each worker process takes one task at a time
#: (prefetch 1), so a queue of mapped partitions spreads over the workers instead of piling onto
#: the first one to ask; two processes a worker, each task holding RECRUIT_EMBEDDING_DB_CONNECTIONS + 1
#: connections. Redis hands a task not acknowledged within ``visibility_timeout`` seconds to another
#: worker, and Airflow acknowledges after the task: 6 h is far above an ingest partition (seconds to
#: minutes, README "Scaling out with Celery") and silences Airflow's warning about Celery's 24 h default.
CELERY_SETTINGS = {
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
}


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the cluster: the worker's name, else the machine's FQDN.

    Every worker of a one-machine cluster has the same FQDN; its name is what tells them apart.
    """
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


class AirflowCluster:
    """``airflow api-server``, ``scheduler`` and ``dag-processor``, with LocalExecutor or Celery workers.

    :param env: base environment (``AIRFLOW_HOME``, ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``,
        connections, DAG folder); the cluster adds executor, API and auth settings.
    :param log_dir: where ``<component>.log`` files go.
    :param parallelism: task slots of the executor; small, since every slot is a process.
    :param executor: ``LocalExecutor`` or ``CeleryExecutor`` (then ``broker_url`` is needed).
    :param broker_url: the Celery broker (``redis://...``); Celery's results go to the metadata database.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_dir: Path,
        api_port: int | None = None,
        parallelism: int = 4,
        executor: str = "LocalExecutor",
        broker_url: str | None = None,
    ) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        if executor == "CeleryExecutor" and not broker_url:
            raise ValueError("the CeleryExecutor needs broker_url (redis://host:port/0)")
        self.api_port = api_port or free_port()
        self.log_dir = Path(log_dir)
        self.executor = executor
        self.env = dict(env)
        self.env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": executor,
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
        if broker_url:  # the cluster's Celery settings, unless ``env`` sets one itself
            self.env = celery_env(broker_url, self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]) | self.env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.components: list[str] = list(COMPONENTS)  # every component started, for log_tails

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

    def _spawn(self, component: str, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        airflow_bin = str(Path(sys.executable).with_name("airflow"))
        if component not in self.components:
            self.components.append(component)
        with open(self.log_path(component), "ab") as log:
            # Own process group: stopping it reaches the workers and supervisors it forks.
            self.procs[component] = subprocess.Popen(
                [airflow_bin, *(argv or [component, *self._args(component)])],
                env={**self.env, **(env or {})},
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

    # -- Celery workers ----------------------------------------------------------------------

    def start_workers(self, *names: str, timeout: float = 240) -> None:
        """Start one ``airflow celery worker`` per name, and wait until Celery reports each ready.

        Slots a worker: ``[celery] worker_concurrency`` (:data:`CELERY_SETTINGS`). Several workers
        share this machine, so each gets its own Celery node name, pid file and no log-serving
        process (they would all take ``[logging] worker_log_server_port``).
        """
        if self.executor != "CeleryExecutor":
            raise RuntimeError("workers need executor='CeleryExecutor'")
        offsets = {}
        for name in names:
            component = f"worker-{name}"
            log = self.log_path(component)
            offsets[name] = log.stat().st_size if log.exists() else 0
            argv = ["celery", "worker", "--celery-hostname", f"{name}@%h", "--skip-serve-logs"]
            argv += ["--pid", str(self.log_dir / f"{component}.pid")]
            self._spawn(component, argv, {WORKER_NAME_ENV: name})
        deadline = time.monotonic() + timeout
        waiting = list(names)
        while waiting:
            self.check_alive()
            for name in list(waiting):
                with open(self.log_path(f"worker-{name}"), "rb") as f:
                    f.seek(offsets[name])
                    if b" ready." in f.read():  # Celery's "celery@<name> ready." once it consumes
                        waiting.remove(name)
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"Celery workers {waiting} were not ready after {timeout:g} s; see {self.log_dir}")
            time.sleep(0.5 if waiting else 0)

    def kill_worker(self, name: str) -> dict[int, int]:
        """SIGKILL worker ``name`` as a machine loss would: every process it started, at once.

        Airflow's task supervisor puts each task process in a process group of its own, so the
        worker's group alone would leave the running tasks behind; this kills the worker's group and
        the group of every process below it. Returns pid -> process group of what was there.
        """
        proc = self.procs.pop(f"worker-{name}")
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        groups: dict[int, int] = {}
        for p in tree:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                groups[p.pid] = os.getpgid(p.pid)
        for group in {proc.pid, *groups.values()}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        return groups

    def check_alive(self) -> None:
        """Raise if a component exited: a dead scheduler would otherwise look like a slow run."""
        for component, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {component} exited with {proc.returncode}; see {self.log_path(component)}")

    def stop(self, *, grace: float = 20) -> None:
        """SIGTERM each process group, then SIGKILL what is still there after ``grace`` seconds.

        Task processes sit in groups of their own (see :meth:`kill_worker`): those still there
        after their worker stopped are killed too.
        """
        procs, self.procs = list(self.procs.values()), {}
        below: list[psutil.Process] = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                below += psutil.Process(proc.pid).children(recursive=True)
        _stop_groups(procs, grace=grace)
        for p in below:
            with contextlib.suppress(psutil.Error):
                p.kill()

    def __enter__(self) -> AirflowCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tails(self, lines: int = 60) -> str:
        """The last ``lines`` of every component's log, for a failure message."""
        parts = []
        for component in self.components:
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

    def task_log(self, ti: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The lines of a task instance's own log (``dag_id=.../attempt=N.log`` under Airflow's
        ``[logging] base_log_folder``, JSON lines with ``timestamp`` and ``event``), as
        :meth:`task_instances` gives the instance; ``[]`` when none."""
        base = self.env.get("AIRFLOW__LOGGING__BASE_LOG_FOLDER") or str(Path(self.env["AIRFLOW_HOME"]) / "logs")
        folder = Path(base) / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}" / f"task_id={ti['task_id']}"
        if ti["map_index"] >= 0:
            folder /= f"map_index={ti['map_index']}"
        path = folder / f"attempt={ti['try_number']}.log"
        if not path.exists():
            return []
        lines = path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def xcom(self, run: Mapping[str, Any], task_id: str, key: str = "return_value", *, map_index: int = -1) -> Any:
        """A task's XCom value in ``run`` (of mapped task instance ``map_index``); a dict or list given
        as JSON text is decoded."""
        query = f"?map_index={map_index}" if map_index >= 0 else ""
        value = self.request("GET", _run_path(run) + f"/taskInstances/{task_id}/xcomEntries/{key}{query}")["value"]
        if isinstance(value, str) and value[:1] in ("{", "["):
            with contextlib.suppress(ValueError):
                return json.loads(value)
        return value


def celery_env(broker_url: str, metadata_conn: str) -> dict[str, str]:
    """Airflow's settings for the CeleryExecutor as the cluster runs them: :data:`CELERY_SETTINGS`, the
    broker, Celery's result backend on the metadata database (``db+`` and its SQLAlchemy URL), and
    task instances named after their worker (:func:`worker_hostname`)."""
    return {
        **CELERY_SETTINGS,
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata_conn,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname",
    }


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
