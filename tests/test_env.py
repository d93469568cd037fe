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
