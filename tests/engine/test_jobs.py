"""Job specs: TOML -> JobSpec round trip, CLI overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starcast.engine.jobs import BACKENDS, JobSpec, load_job

from starcast.errors import StarcastError

specs = st.builds(
    JobSpec,
    input=st.sampled_from(["/data/cat", "/data/shards/*.parquet"]),
    out=st.just("/scratch/out"),
    model=st.none() | st.sampled_from(["ob-default", "/models/my bundle"]),
    samples=st.none() | st.integers(1, 256),
    seed=st.integers(0, 2**31),
    backend=st.sampled_from(BACKENDS),
    batch_size=st.integers(1, 65536),
    ray=st.none() | st.sampled_from(["auto", "10.0.0.1:6379"]),
    resume=st.booleans(),
    progress=st.booleans(),
)


@given(spec=specs)
def test_job_spec_round_trips_through_toml(spec: JobSpec, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("job") / "job.toml"
    path.write_text(spec.to_toml())
    assert load_job(path) == spec


def test_unknown_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[run]\ninput = "cat"\nout = "out"\nbatchsize = 100\n')
    with pytest.raises(StarcastError, match="unknown key 'batchsize'"):
        load_job(path)


def test_unknown_table_and_wrong_type_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[run]\ninput = "cat"\nout = "out"\n[model]\nname = "x"\n')
    with pytest.raises(StarcastError, match="unknown table 'model'"):
        load_job(path)
    path.write_text('[run]\ninput = "cat"\nout = "out"\nseed = "3"\n')
    with pytest.raises(StarcastError, match="seed = '3' should be int"):
        load_job(path)


def test_a_value_out_of_range_is_an_error_naming_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[run]\ninput = "cat"\nout = "out"\nsamples = 0\n')
    with pytest.raises(StarcastError, match=f"job spec {path}: samples must be at least 1, got 0"):
        load_job(path)


def test_command_line_options_override_the_spec_and_paths_are_relative_to_it(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[run]\ninput = "cat"\nout = "out"\nseed = 3\nsamples = 8\nmodel = "models/m"\n')
    spec = load_job(path, seed=5, samples=None, out="/elsewhere")
    assert spec.seed == 5 and spec.samples == 8 and spec.out == "/elsewhere"
    assert spec.input == str(tmp_path / "cat") and spec.model == str(tmp_path / "models/m")


def test_missing_input_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[run]\nout = "out"\n')
    with pytest.raises(StarcastError, match="needs 'input'"):
        load_job(path)
