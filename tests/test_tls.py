"""TLS for HTTP, gRPC and metrics from certificate files, with certificates the test makes
(a CA, a server certificate for 127.0.0.1, a client certificate for mutual TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from rawhttp import make_repository
from serverproc import ServerProcess


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, certificate: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_certificates(folder: Path) -> dict[str, Path]:
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder(subject_name=_name("triserve test CA"), issuer_name=_name("triserve test CA"),
                                  public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage, san: list | None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder(subject_name=_name(common_name), issuer_name=ca.subject,
                                           public_key=key.public_key(), serial_number=x509.random_serial_number(),
                                           **valid)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    ca_path, _ = _write(folder / "ca", ca, ca_key)
    server_cert, server_key = _write(folder / "server", *leaf(
        "127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]))
    client_cert, client_key = _write(folder / "client", *leaf("test client", ExtendedKeyUsageOID.CLIENT_AUTH, None))
    return {"ca": ca_path, "server_cert": server_cert, "server_key": server_key,
            "client_cert": client_cert, "client_key": client_key}


FP32 = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("tls"), ["identity_fp32"])


@pytest.fixture(scope="module")
def tls_server(repository, certificates):
    args = ["--tls-cert", str(certificates["server_cert"]), "--tls-key", str(certificates["server_key"])]
    with ServerProcess(repository, args=args, tls_ca=certificates["ca"]) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(repository, certificates):
    args = ["--tls-cert", str(certificates["server_cert"]), "--tls-key", str(certificates["server_key"]),
            "--tls-client-ca", str(certificates["ca"])]
    client = (certificates["client_cert"], certificates["client_key"])
    with ServerProcess(repository, args=args, tls_ca=certificates["ca"], tls_client=client) as server:
        yield server


def grpc_client(server, certificates, client_cert: bool = False) -> grpcclient.InferenceServerClient:
    extra = {}
    if client_cert:
        extra = {"private_key": str(certificates["client_key"]), "certificate_chain": str(certificates["client_cert"])}
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(certificates["ca"]),
                                            **extra)


def fp32_input(values):
    tensor = grpcclient.InferInput("INPUT0", [len(values)], "FP32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.float32))
    return tensor


def test_https_and_metrics_over_tls(tls_server, certificates):
    ca = str(certificates["ca"])
    response = requests.post(f"https://127.0.0.1:{tls_server.http_port}/v2/models/identity_fp32/infer",
                             json=FP32, verify=ca, timeout=10)
    assert response.status_code == 200 and response.json()["outputs"][0]["data"] == [1.0, 2.0]
    response = requests.get(f"https://127.0.0.1:{tls_server.metrics_port}/metrics", verify=ca, timeout=10)
    assert response.status_code == 200 and "nv_inference_request_success" in response.text
    # plain HTTP is not served on a TLS port, and a client that does not trust the CA refuses the server
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_server.http_port}/v2/health/ready", timeout=10)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"https://127.0.0.1:{tls_server.http_port}/v2/health/ready", timeout=10)


def test_grpc_over_tls(tls_server, certificates):
    client = grpc_client(tls_server, certificates)
    assert client.is_server_ready()
    result = client.infer("identity_fp32", [fp32_input([4.0])])
    assert result.as_numpy("OUTPUT0").tolist() == [4.0]
    plain = grpcclient.InferenceServerClient(tls_server.grpc_url)
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)
    plain.close()
    client.close()


def test_mutual_tls_needs_a_client_certificate(mtls_server, certificates):
    ca = str(certificates["ca"])
    url = f"https://127.0.0.1:{mtls_server.http_port}/v2/models/identity_fp32/infer"
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
        requests.post(url, json=FP32, verify=ca, timeout=10)
    response = requests.post(url, json=FP32, verify=ca, timeout=10,
                             cert=(str(certificates["client_cert"]), str(certificates["client_key"])))
    assert response.status_code == 200

    anonymous = grpc_client(mtls_server, certificates)
    with pytest.raises(InferenceServerException):
        anonymous.is_server_live(client_timeout=5)
    anonymous.close()
    client = grpc_client(mtls_server, certificates, client_cert=True)
    assert client.infer("identity_fp32", [fp32_input([6.0])]).as_numpy("OUTPUT0").tolist() == [6.0]
    client.close()


def test_tls_options_are_checked_at_the_command_line(tmp_path, certificates):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "triserve", "serve", "--model-repository", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60)

    result = serve("--tls-cert", str(certificates["server_cert"]))
    assert result.returncode == 2 and "--tls-cert and --tls-key go together" in result.stderr
    result = serve("--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(certificates["server_key"]))
    assert result.returncode == 2 and "is not a file" in result.stderr
    result = serve("--api-key", "")
    assert result.returncode == 2 and "empty key" in result.stderr
