"""Pure unit tests of the configuration helpers."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from loft.env import Env, read_env_file, write_env_file


def test_the_environment_wins_over_the_stacks_env_file():
    env = Env(
        environ={"DATABASE_URL": "postgresql://outside/db"},
        file_values={"DATABASE_URL": "x", "S3_BUCKET": "b"},
    )
    assert env.string("DATABASE_URL") == "postgresql://outside/db"
    assert env.string("S3_BUCKET") == "b"


def test_a_missing_required_value_names_the_variable():
    with pytest.raises(ImproperlyConfigured, match="DJANGO_SECRET_KEY"):
        Env(environ={}, file_values={}).string("DJANGO_SECRET_KEY")


@pytest.mark.parametrize("raw", ["maybe", "2"])
def test_a_bad_boolean_is_refused_with_its_name(raw):
    with pytest.raises(ImproperlyConfigured, match="DJANGO_DEBUG"):
        Env(environ={"DJANGO_DEBUG": raw}, file_values={}).boolean("DJANGO_DEBUG")


def test_the_env_file_round_trips_and_is_private(tmp_path):
    path = tmp_path / "env"
    write_env_file(path, {"A": "1", "B": "postgresql://x@y:1/z"})
    assert read_env_file(path) == {"A": "1", "B": "postgresql://x@y:1/z"}
    assert path.stat().st_mode & 0o077 == 0


def test_a_malformed_env_file_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "env"
    path.write_text("A=1\nnonsense\n")
    with pytest.raises(ImproperlyConfigured, match="line 2"):
        read_env_file(path)


def test_a_list_of_integers_is_read_and_a_bad_one_refused_with_its_name():
    env = Env(environ={"DELAYS": "1, 2,30", "BAD": "1,soon"}, file_values={})
    assert env.integers("DELAYS", [5]) == [1, 2, 30]
    assert env.integers("MISSING", [5]) == [5]
    with pytest.raises(ImproperlyConfigured, match="BAD"):
        env.integers("BAD", [5])


def test_trusted_proxies_are_addresses_or_ranges_and_a_bad_one_is_named():
    env = Env(
        environ={"PROXIES": "10.0.0.0/8, 192.0.2.7,::1", "BAD": "10.0.0.0/8,proxy"}, file_values={}
    )
    assert [str(network) for network in env.networks("PROXIES")] == [
        "10.0.0.0/8",
        "192.0.2.7/32",
        "::1/128",
    ]
    assert env.networks("MISSING") == []
    with pytest.raises(ImproperlyConfigured, match="BAD: 'proxy' is not an IP address"):
        env.networks("BAD")


def test_the_https_header_is_a_header_name_read_as_djangos_meta_key():
    env = Env(environ={"HEADER": "X-Forwarded-Proto", "BAD": "X-Proto: https"}, file_values={})
    assert env.https_header("HEADER") == ("HTTP_X_FORWARDED_PROTO", "https")
    assert env.https_header("MISSING") is None
    with pytest.raises(ImproperlyConfigured, match="BAD"):
        env.https_header("BAD")
