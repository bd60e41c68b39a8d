"""`rediss://` with a CA from the URL: producer, status records and a worker all over TLS."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from producer.client import Client
from producer.contract import JobState
from producer.local_redis import find_redis_server, free_port
from tests.integration.conftest import SMALL

pytestmark = pytest.mark.integration


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svdq test redis")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_redis_url(tmp_path: Path) -> Iterator[str]:
    binary = find_redis_server()
    assert binary is not None
    cert, key = self_signed(tmp_path)
    port = free_port()
    args = [
        binary,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(tmp_path),
        "--save",
        "",
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    ]
    with (tmp_path / "redis.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    deadline = time.monotonic() + 10
    while True:
        time.sleep(0.1)
        if proc.poll() is not None:
            if "TLS" in (tmp_path / "redis.log").read_text(errors="replace"):
                pytest.skip("this redis-server was built without TLS")
            raise RuntimeError((tmp_path / "redis.log").read_text())
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_a_job_over_rediss(tls_redis_url: str, start_worker: Any, image_file: Path) -> None:
    worker = start_worker(env={"SVDQ_REDIS_URL": tls_redis_url})
    with Client.from_env(redis_url=tls_redis_url, queue=worker.queue) as client:
        final = client.submit(image_file, **SMALL).wait(timeout=120)
    assert final.state is JobState.SUCCEEDED, final.error
    # The port speaks TLS only: nothing went over plain text.
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(tls_redis_url.replace("rediss://", "redis://").split("?")[0]).ping()
