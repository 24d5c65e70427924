"""Shared pytest fixtures.

``s3_server``: a real S3-compatible server (moto's server mode on 127.0.0.1, free port) for the
whole session, stopped at the end; tests create their own bucket with ``make_bucket``.
"""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.s3server import MotoServer

    server = MotoServer(str(tmp_path_factory.mktemp("moto") / "moto.log"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the session server; returns its name."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.make_bucket(name)
    return name
