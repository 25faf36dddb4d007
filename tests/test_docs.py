"""The user documentation in `docs/` names every contract the code defines: each flag bit with its
value, each job-spec key, each preprocessing setting and manifest key, each results-metadata key.
A new flag or key without its line in docs/ fails here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from starcast.catalogs import schema
from starcast.engine import bundle, jobs, manifest, predictor
from starcast.kernels.preprocess import PreprocessSettings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _text(name: str) -> str:
    return (DOCS / name).read_text()


@pytest.mark.parametrize("flag", list(schema.Flag), ids=lambda f: f.name)
def test_every_flag_has_a_row_with_its_bit_in_results_md(flag):
    assert re.search(rf"^\| {flag.value} \| {flag.name} \|", _text("results.md"), re.MULTILINE)


def test_every_job_spec_key_is_in_running_md():
    text = _text("running.md")
    missing = [f.name for f in dataclasses.fields(jobs.JobSpec) if f"| `{f.name}` |" not in text]
    assert not missing


def test_every_preprocess_setting_and_manifest_key_is_in_models_md():
    text = _text("models.md")
    keys = [f.name for f in dataclasses.fields(PreprocessSettings)]
    keys += [*bundle.REQUIRED_KEYS, *bundle.TARGET_KEYS, *bundle.OPTIONAL_TARGET_KEYS,
             *bundle.ARCHITECTURE_KEYS, bundle.INPUT_CENTRE]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing


def test_results_metadata_and_catalog_metadata_keys_are_documented():
    identity = manifest.RunIdentity("m", "0" * 64, 0, 1, "v", "cpu")
    results_keys = set(identity.file_metadata(Path("x.parquet"))) | set(
        predictor.load_model("ob-default").metadata())
    assert not [k for k in results_keys if f"`{k}`" not in _text("results.md")]
    catalog_keys = (schema.META_WAVELENGTH, schema.META_MEDIUM, schema.META_RESOLVING_POWER,
                    schema.META_GENERATOR)
    assert not [k for k in catalog_keys if f"`{k}`" not in _text("catalogs.md")]


def test_links_between_docs_point_to_existing_files():
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"
