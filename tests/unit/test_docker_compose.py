"""``docker-compose.yaml`` and ``Dockerfile`` checked against the code, without a Docker engine.

Every command must parse with the real parsers (``airflow-embedding`` with ``cli.build_parser()``,
the dev tools' ``python -m dev`` with ``dev.cli.build_parser()``, Airflow's with its own), the connections must name the ids the DAGs and operators use and point at
the services and ``--port``s that serve them, and every ``depends_on`` must name a service.
Compose-style ``${VAR:-default}`` values are read with their defaults, as a bare ``docker compose up``
would see them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from airflow_embedding_provider import cli
from dev import cli as dev_cli

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
AIRFLOW_IMAGE = "apache/airflow:3.3.2"

# Server subcommand -> the service that runs it and the connection (if any) that points at it.
SERVERS = {
    "ai-server": ("ai-server", "embedding_grpc_default"),
    "api-server": ("api-server", "cache_grpc_default"),
    "upload-server": ("upload-server", None),
}
AIRFLOW_COMPONENTS = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
# The Celery commands come from the Celery provider, which the official image has and our venv not.
CELERY_COMMANDS = (["celery", "worker"], ["celery", "flower"])
# The dev tools (sample data, the reference API server) are not in the image: the services that run
# them mount the checkout's dev/ read-only and run it as a module from there.
DEV_ENTRYPOINT = ["python", "-m", "dev"]
DEV_MOUNT = "./dev:/opt/dev/dev:ro"

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose interpolation with every variable unset: ``${X:-d}`` -> d, ``${X}`` -> '', ``$$`` -> ``$``."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services in docker-compose.yaml"
    return dict(interpolate(data))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def argv(service: dict[str, Any]) -> list[str]:
    """What the container runs (entrypoint + command), as exec-form lists only."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        assert isinstance(value, list), f"{key} must be a list (exec form), got {value!r}"
        parts += [str(v) for v in value]
    return parts


def parse_cli(args: list[str], build_parser: Any = cli.build_parser) -> argparse.Namespace:
    """``airflow-embedding <args>`` (or ``python -m dev <args>`` with that parser) through the real
    parser; a refused command fails with its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{build_parser().prog} refuses {args}: {err.getvalue().strip().splitlines()[-1:]}")


def runs_our_cli(service: dict[str, Any]) -> bool:
    return argv(service)[:1] == ["airflow-embedding"] or argv(service)[: len(DEV_ENTRYPOINT)] == DEV_ENTRYPOINT


def embedding_services(services: dict[str, dict[str, Any]]) -> dict[str, argparse.Namespace]:
    """Service name -> parsed ``airflow-embedding`` or ``python -m dev`` command, for every service that runs one."""
    parsed: dict[str, argparse.Namespace] = {}
    for name, svc in services.items():
        if argv(svc)[:1] == ["airflow-embedding"]:
            parsed[name] = parse_cli(argv(svc)[1:])
        elif argv(svc)[: len(DEV_ENTRYPOINT)] == DEV_ENTRYPOINT:
            parsed[name] = parse_cli(argv(svc)[len(DEV_ENTRYPOINT) :], dev_cli.build_parser)
    return parsed


def subcommands() -> set[str]:
    """The sub-commands of ``airflow-embedding`` and of the dev tools' ``python -m dev``."""
    names: set[str] = set()
    for parser in (cli.build_parser(), dev_cli.build_parser()):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        names |= set(action.choices)
    return names


def code_conn_ids() -> set[str]:
    """Connection ids the operators default to and the DAG files name."""
    ids: set[str] = set()
    for module_name in ("embedding_stream", "dlq_replay", "cache_invalidate"):
        module = importlib.import_module(f"airflow_embedding_provider.operators.{module_name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for name, param in inspect.signature(cls.__init__).parameters.items():
                if name.endswith("conn_id") and isinstance(param.default, str):
                    ids.add(param.default)
    for dag_file in (REPO / "dags").glob("*.py"):
        ids |= set(re.findall(r"conn_id\s*=\s*[\"']([\w-]+)[\"']", dag_file.read_text(encoding="utf-8"), re.I))
    return ids


def airflow_env(services: dict[str, dict[str, Any]], name: str) -> dict[str, str]:
    env = services[name].get("environment") or {}
    assert isinstance(env, dict), f"{name}: environment must be a mapping"
    return {k: str(v) for k, v in env.items()}


# -- airflow-embedding commands -------------------------------------------------------------------


def test_every_server_subcommand_exists_in_the_cli() -> None:
    missing = {"sample", *SERVERS} - subcommands()
    assert not missing, (
        f"docker-compose.yaml runs `airflow-embedding {' / '.join(sorted(missing))}`, which cli.build_parser() "
        f"does not have (subcommands: {sorted(subcommands())})"
    )


def test_every_airflow_embedding_command_parses(services: dict[str, dict[str, Any]]) -> None:
    parsed = embedding_services(services)
    assert {args.command for args in parsed.values()} >= {"sample", *SERVERS}, parsed
    for name, args in parsed.items():
        if args.command in SERVERS:
            assert SERVERS[args.command][0] == name, f"{args.command} runs in service {name}"
            assert args.host == "0.0.0.0", f"{name} must listen on every interface, not {args.host}"


def test_the_ai_server_serves_the_sample_the_one_shot_writes(services: dict[str, dict[str, Any]]) -> None:
    parsed = embedding_services(services)
    sample = next(n for n, a in parsed.items() if a.command == "sample")
    assert parsed["ai-server"].pkl == parsed[sample].out
    assert services["ai-server"]["depends_on"][sample]["condition"] == "service_completed_successfully"
    # Both see the same volume at the folder of the file.
    folder = str(Path(parsed[sample].out).parent)
    mounts = [{v for v in services[n]["volumes"] if v.endswith(":" + folder)} for n in (sample, "ai-server")]
    assert mounts[0] and mounts[0] == mounts[1], mounts


def test_ports_and_health_probes_match_the_servers(services: dict[str, dict[str, Any]]) -> None:
    for name, args in embedding_services(services).items():
        if args.command not in SERVERS:
            continue
        svc = services[name]
        # Published on the host's loopback only: the compose network is where the clients are.
        assert svc.get("ports") == [f"127.0.0.1:{args.port}:{args.port}"], f"{name} publishes {svc.get('ports')}"
        probe = " ".join(svc["healthcheck"]["test"])
        assert "grpc_health" in probe and f"127.0.0.1:{args.port}" in probe, f"{name} health probe: {probe}"


def test_every_published_port_is_on_the_hosts_loopback(services: dict[str, dict[str, Any]]) -> None:
    # The database has a default password and the Airflow UI a default user: neither beyond the host.
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert {"airflow-apiserver", "flower"} <= set(published) and any(
        "5432" in p for ps in published.values() for p in ps
    )
    for name, ports in published.items():
        assert all(str(p).startswith("127.0.0.1:") for p in ports), f"{name} publishes {ports} beyond loopback"


# -- connections ----------------------------------------------------------------------------------


def test_connection_ids_agree_with_the_code(services: dict[str, dict[str, Any]]) -> None:
    in_code = code_conn_ids()
    assert in_code >= {"embedding_grpc_default", "postgres_default", "cache_grpc_default"}, in_code
    for name in (*AIRFLOW_COMPONENTS, "airflow-worker"):
        env = airflow_env(services, name)
        in_compose = {k.removeprefix("AIRFLOW_CONN_").lower() for k in env if k.startswith("AIRFLOW_CONN_")}
        assert in_compose == in_code, f"{name}: connections {sorted(in_compose)}, the code uses {sorted(in_code)}"


def test_grpc_connections_point_at_the_servers(services: dict[str, dict[str, Any]]) -> None:
    from airflow.models.connection import Connection

    from airflow_embedding_provider.get_provider_info import get_provider_info

    conn_types = {c["connection-type"] for c in get_provider_info()["connection-types"]}
    parsed = embedding_services(services)
    env = airflow_env(services, "airflow-scheduler")
    for command, (service, conn_id) in SERVERS.items():
        if conn_id is None:
            continue
        raw = env[f"AIRFLOW_CONN_{conn_id.upper()}"]
        assert json.loads(raw)["conn_type"] in conn_types, raw
        conn = Connection.from_json(raw, conn_id=conn_id)  # as Airflow reads it from the environment
        assert (conn.host, conn.port) == (service, parsed[service].port), f"{conn_id} -> {command}: {raw}"


def test_postgres_connection_and_upload_server_use_the_pgvector_database(services: dict[str, dict[str, Any]]) -> None:
    pgvector = services["pgvector"]
    image = str(pgvector["image"])
    assert re.fullmatch(r"pgvector/pgvector:0\.(8|9)\.\d+-pg1[78]", image), (
        f"{image}: want pgvector 0.8+ (iterative scans)"
    )
    db_env = pgvector["environment"]
    dsn = airflow_env(services, "airflow-scheduler")["AIRFLOW_CONN_POSTGRES_DEFAULT"]
    url = urlsplit(dsn)
    assert (url.scheme, url.hostname, url.port or 5432) == ("postgresql", "pgvector", 5432), dsn
    assert (url.username, url.password, url.path.lstrip("/")) == (
        db_env["POSTGRES_USER"],
        db_env["POSTGRES_PASSWORD"],
        db_env["POSTGRES_DB"],
    )
    # The upload server reads the same connection from its environment: no password in its argv.
    upload = embedding_services(services)["upload-server"]
    assert (upload.postgres_conn_id, upload.postgres_dsn, upload.postgres_dsn_file) == ("postgres_default", None, None)
    assert airflow_env(services, "upload-server")["AIRFLOW_CONN_POSTGRES_DEFAULT"] == dsn


def test_airflow_runs_on_its_own_metadata_database(services: dict[str, dict[str, Any]]) -> None:
    env = airflow_env(services, "airflow-scheduler")
    url = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert url.hostname == "airflow-db" and url.hostname != "pgvector"
    assert url.scheme.startswith("postgresql")
    assert url.path.lstrip("/") == services["airflow-db"]["environment"]["POSTGRES_DB"]


# -- Airflow components ----------------------------------------------------------------------------


def test_airflow_commands_parse(services: dict[str, dict[str, Any]]) -> None:
    from airflow.cli.cli_parser import get_parser

    # Services of our image that keep its entrypoint run `airflow <command>`.
    airflow_commands = {n: argv(s) for n, s in services.items() if s.get("build") and not runs_our_cli(s)}
    for name, args in airflow_commands.items():
        if args[:1] == ["celery"]:
            assert args in CELERY_COMMANDS, f"{name}: {args}"
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                get_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{name}: `airflow {' '.join(args)}` refused: {err.getvalue().strip().splitlines()[-1:]}")
    assert {tuple(airflow_commands[n][:1]) for n in AIRFLOW_COMPONENTS} == {
        ("api-server",),
        ("scheduler",),
        ("dag-processor",),
        ("triggerer",),
    }
    assert airflow_commands["airflow-init"] == ["db", "migrate"]


def test_executor_is_local_by_default_and_celery_is_a_profile(services: dict[str, dict[str, Any]]) -> None:
    env = airflow_env(services, "airflow-scheduler")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    for name in ("redis", "airflow-worker"):
        assert services[name].get("profiles") == ["celery"], name
    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis"


def test_task_workers_reach_the_execution_api(services: dict[str, dict[str, Any]]) -> None:
    api_args = argv(services["airflow-apiserver"])
    port = int(api_args[api_args.index("--port") + 1])
    for name in (*AIRFLOW_COMPONENTS, "airflow-worker"):
        env = airflow_env(services, name)
        url = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert (url.hostname, url.port, url.path) == ("airflow-apiserver", port, "/execution/"), name
        # The scheduler signs task tokens the API server checks: one secret everywhere.
        assert (
            env["AIRFLOW__API_AUTH__JWT_SECRET"]
            == airflow_env(services, "airflow-apiserver")["AIRFLOW__API_AUTH__JWT_SECRET"]
        )


def test_databases_have_pg_isready_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("airflow-db", "pgvector"):
        assert services[name]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"], name


def test_long_running_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    one_shots = {n for n, s in services.items() if s.get("restart") == "no"}
    assert one_shots == {"airflow-init", "sample-data", "grpc-token"}
    missing = sorted(n for n, s in services.items() if n not in one_shots and not s.get("healthcheck"))
    assert not missing, f"no healthcheck: {missing}"


# -- dependencies and the image ---------------------------------------------------------------------


def test_depends_on_names_services_without_cycles(services: dict[str, dict[str, Any]]) -> None:
    deps: dict[str, set[str]] = {}
    for name, svc in services.items():
        raw = svc.get("depends_on") or {}
        deps[name] = set(raw) if isinstance(raw, (dict, list)) else set()
        unknown = deps[name] - set(services)
        assert not unknown, f"{name} depends on unknown services {sorted(unknown)}"
        # Compose refuses a dependency that a profile may switch off while the dependant runs.
        if not svc.get("profiles"):
            profiled = sorted(d for d in deps[name] if services[d].get("profiles"))
            assert not profiled, f"{name} (always on) depends on profile-only {profiled}"

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"depends_on cycle: {' -> '.join((*path, node))}"
        for dep in deps[node]:
            visit(dep, (*path, node))

    for name in services:
        visit(name, ())


def test_services_build_the_provider_image(services: dict[str, dict[str, Any]]) -> None:
    uses_image = {n for n, s in services.items() if s.get("build")}
    assert uses_image >= {*AIRFLOW_COMPONENTS, "airflow-init", "airflow-worker", *SERVERS}
    assert {services[n]["build"] for n in uses_image} == {"."}


def test_dockerfile_installs_the_package() -> None:
    import airflow

    lines = [ln.strip() for ln in DOCKERFILE.read_text(encoding="utf-8").splitlines()]
    assert f"FROM {AIRFLOW_IMAGE}" in lines
    assert AIRFLOW_IMAGE.endswith(airflow.__version__), "the image's Airflow should be the one we test with"
    copied = " ".join(ln for ln in lines if ln.startswith("COPY"))
    # pyproject.toml needs README.md (readme) and include/ (force-included SQL) to build the wheel.
    for path in ("pyproject.toml", "README.md", "airflow_embedding_provider", "include", "dags"):
        assert re.search(rf"\s{re.escape(path)}[\s/]", copied + " "), f"Dockerfile does not copy {path}"
    install = [ln for ln in lines if ln.startswith("RUN") and "pip install" in ln]
    assert install and "/opt/provider" in install[0], install
    # The celery profile's workers need the extra's pins (celery<5.7 for the Celery provider).
    assert "/opt/provider[celery]" in install[0], install
    ignored = {ln for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines() if ln and ln[0] != "#"}
    assert not ignored & {"pyproject.toml", "README.md", "airflow_embedding_provider", "include", "dags"}


def test_celery_settings_are_the_ones_the_cluster_test_proves(services: dict[str, dict[str, Any]]) -> None:
    from dev.airflow_cluster import CELERY_SETTINGS

    metadata = airflow_env(services, "airflow-scheduler")["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    for name in ("airflow-scheduler", "airflow-worker"):
        env = airflow_env(services, name)
        assert {k: env.get(k) for k in CELERY_SETTINGS} == CELERY_SETTINGS, name
        # Celery's results go to Airflow's metadata database, as in the test.
        backend = env["AIRFLOW__CELERY__RESULT_BACKEND"]
        assert backend.startswith("db+") and urlsplit(backend[3:])[1:] == urlsplit(metadata)[1:], backend


# -- the bearer token and other secrets -------------------------------------------------------------


def token_file(services: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The service that writes the token (``airflow-embedding token --out``) and the file."""
    writers = {n: a.out for n, a in embedding_services(services).items() if a.command == "token"}
    assert len(writers) == 1, f"one service must generate the token, found {sorted(writers)}"
    ((name, out),) = writers.items()
    return name, str(out)


def mounts_folder(service: dict[str, Any], folder: str) -> str | None:
    """The volume ``service`` mounts at ``folder``, if any."""
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == folder:
            return source
    return None


def test_servers_on_every_interface_require_the_generated_token(services: dict[str, dict[str, Any]]) -> None:
    from airflow_embedding_provider.security import ServerSecurity

    writer, path = token_file(services)
    folder = str(Path(path).parent)
    volume = mounts_folder(services[writer], folder)
    assert volume, f"{writer} writes {path} outside a volume"
    for name, args in embedding_services(services).items():
        if args.command not in SERVERS:
            continue
        assert str(args.token_file) == path and not args.insecure, f"{name}: token {args.token_file}, {args.insecure=}"
        assert mounts_folder(services[name], folder) == volume, f"{name} does not see the token volume"
        assert services[name]["depends_on"][writer]["condition"] == "service_completed_successfully"
        # What the server does with these options: listen on 0.0.0.0 because a token is required ...
        ServerSecurity(token="from the file").check_exposure(args.host)
        # ... and refuse to without one.
        with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0 without a bearer token"):
            ServerSecurity.from_args(
                argparse.Namespace(**{**vars(args), "token_file": None}), environ={}
            ).check_exposure(args.host)


def test_airflow_connections_read_the_same_token_file(services: dict[str, dict[str, Any]]) -> None:
    from airflow.models.connection import Connection

    from airflow_embedding_provider.get_provider_info import get_provider_info

    writer, path = token_file(services)
    assert "token_file" in get_provider_info()["connection-types"][0]["conn-fields"]
    volume = mounts_folder(services[writer], str(Path(path).parent))
    for name in (*AIRFLOW_COMPONENTS, "airflow-worker"):
        env = airflow_env(services, name)
        for _command, (_service, conn_id) in SERVERS.items():
            if conn_id is None:
                continue
            conn = Connection.from_json(env[f"AIRFLOW_CONN_{conn_id.upper()}"], conn_id=conn_id)
            assert conn.extra_dejson.get("token_file") == path, f"{name}: {conn_id} has no token_file {path}"
            assert "token" not in conn.extra_dejson and not conn.password, f"{name}: {conn_id} carries a token"
        assert mounts_folder(services[name], str(Path(path).parent)) == volume, f"{name} cannot read the token"
        assert services[name]["depends_on"][writer]["condition"] == "service_completed_successfully", name


def test_no_command_carries_a_password(services: dict[str, dict[str, Any]]) -> None:
    # argv is in `ps` and `docker inspect`; a connection string with a password belongs elsewhere.
    credentials = re.compile(r"://[^/\s:@]+:[^@\s]+@")
    for name, svc in services.items():
        args = " ".join(argv(svc)) if svc.get("build") else " ".join(map(str, svc.get("command") or []))
        assert not credentials.search(args), f"{name} has a password in its command: {args}"


def test_the_image_holds_no_dev_tools(services: dict[str, dict[str, Any]]) -> None:
    """The image is what a production deployment runs: dev/ is neither copied nor in the build context;
    the services of the dev tools mount it from the checkout, read-only, and only they do."""
    copied = " ".join(
        ln.strip() for ln in DOCKERFILE.read_text(encoding="utf-8").splitlines() if ln.strip().startswith("COPY")
    )
    assert not re.search(r"\s\.?/?(dev|tests|bench|scripts)[\s/]", copied + " "), copied
    ignored = {ln for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines() if ln and ln[0] != "#"}
    assert {"dev", "tests", "bench", "scripts"} <= ignored
    dev_services = {n for n, s in services.items() if argv(s)[: len(DEV_ENTRYPOINT)] == DEV_ENTRYPOINT}
    assert dev_services == {"sample-data", "api-server"}
    for name, svc in services.items():
        mounted = DEV_MOUNT in (svc.get("volumes") or [])
        assert mounted == (name in dev_services), f"{name}: dev/ mounted {mounted}"
        if mounted:
            assert svc.get("working_dir") == DEV_MOUNT.split(":")[1].rsplit("/", 1)[0], f"{name}: working_dir"
