"""The public names of `s3xfer`, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import s3xfer


def test_every_public_name_resolves_to_its_home_module() -> None:
    for name in s3xfer.__all__:
        value = getattr(s3xfer, name)
        if name != "__version__":
            assert value.__module__ == f"s3xfer.{s3xfer._HOMES[name]}", name
    assert set(s3xfer.__all__) == {"__version__", *s3xfer._HOMES}


def test_survey_and_upload_stay_functions_once_their_modules_are_imported() -> None:
    import s3xfer.planning.survey  # the modules that share the functions' names
    import s3xfer.write.upload

    assert callable(s3xfer.survey) and s3xfer.survey.__name__ == "survey"
    assert callable(s3xfer.upload) and s3xfer.upload.__name__ == "upload"
    from s3xfer import survey, upload

    assert survey is s3xfer.planning.survey.survey and upload is s3xfer.write.upload.upload


def test_unknown_names_raise_attribute_error() -> None:
    try:
        s3xfer.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("s3xfer.no_such_name resolved")


def test_importing_the_package_loads_none_of_its_modules() -> None:
    probe = "import sys, s3xfer; print(sorted(m for m in sys.modules if m.startswith('s3xfer.')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
