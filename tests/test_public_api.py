"""The package's public names: lazy, listed, and a clear error for any other."""

import pytest

import starcast


def test_the_lazy_public_names_are_listed_and_any_other_is_an_attribute_error():
    names = dir(starcast)
    assert {"load_model", "run", "synth", "__version__"} <= set(names) and "import_module" not in names
    assert callable(starcast.synth)
    with pytest.raises(AttributeError, match="no attribute 'predict'"):
        starcast.predict  # noqa: B018
