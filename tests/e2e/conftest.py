"""Fixtures of the end-to-end tests: the image archive (a real Orthanc on 127.0.0.1), the same
fixture as the dashboard's archive tests use."""

from tests.app.dashboard.orthanc import orthanc_archive  # noqa: F401
