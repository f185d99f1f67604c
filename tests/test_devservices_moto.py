"""devservices.moto: the detached moto server `make aws-up` starts, and stops without leftovers."""

from __future__ import annotations

import socket

import boto3
import pytest

from devservices import moto as devmoto
from devservices import servers


@pytest.mark.aws
def test_up_serves_aws_apis_and_down_stops_the_process(codemind_home):
    url = devmoto.up()
    try:
        pid, recorded = devmoto.running()
        assert recorded == url and devmoto.up() == url  # a second up reuses the running server
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        s3.create_bucket(Bucket="codemind-devservice")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["codemind-devservice"]
    finally:
        assert devmoto.down()
    assert not servers.alive(pid)
    assert devmoto.running() is None and devmoto.down() is False


@pytest.mark.aws
def test_a_port_in_use_is_a_clear_error_and_nothing_is_recorded(codemind_home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"exited with .* on port {port}"):
            devmoto.up(port, timeout_s=20)
    assert devmoto.running() is None
