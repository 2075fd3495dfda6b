"""`fedfew node init` / `node run` checks and `fedfew server init` files, without processes: each
bad input gives a typed error whose message names the value and the fix."""

from __future__ import annotations

import datetime as dt
import stat
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from PIL import Image

from federation.deploy.certificates import make_ca, make_server_certificate
from federation.deploy.provisioning import (
    check_node_file,
    init_node,
    read_node_file,
    rotate_node_key,
    supernode_command,
)
from federation.deploy.server_provisioning import (
    check_server_file,
    init_server,
    read_server_file,
    renew_server_certificate,
    run_config_values,
    superlink_command,
)
from federation.errors import CertificateError, NodeConfigError, ProvisioningError
from federation.node_config import CONFIG_FILE_KEY, NodeConfig
from federation.server_config import ServerConfig
from models.errors import DataError
from models.synthetic import write_synthetic_npz
from privacy.ledger import Ledger


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    return make_ca(tmp_path / "certs")[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_synthetic_npz(tmp_path / "data.npz", n_classes=3, per_class=6, seed=0)


def provision(tmp_path: Path, ca: Path, data: Path, **changes) -> Path:
    values = {
        "site": "hospital-a",
        "data": data,
        "superlink": "127.0.0.1:9092",
        "ca": ca,
        "budget_epsilon": 8.0,
        **changes,
    }
    return init_node(tmp_path / "node", **values).node_file.path


def test_node_init_writes_config_key_ledger_and_the_clientapp_reads_only_node(tmp_path, ca, data):
    made = init_node(
        tmp_path / "node",
        site="hospital-a",
        data=data,
        superlink="fedfew.example.org:9092",
        ca=ca,
        budget_epsilon=6.5,
    )
    path = made.node_file.path
    tables = tomllib.loads(path.read_text())
    assert set(tables) == {"node", "connection"}
    assert tables["connection"] == {
        "superlink": "fedfew.example.org:9092",
        "ca": "ca.crt",
        "key": "hospital-a",
        "port": 9094,
    }
    config = NodeConfig.from_mapping({CONFIG_FILE_KEY: str(path)})  # what the ClientApp does
    assert config.budget_epsilon == 6.5 and config.site_id == "hospital-a"
    assert config.ledger.is_absolute() and config.data == data.absolute()
    assert Ledger.open(config.ledger).cap_epsilon == 6.5
    key = made.node_file.connection.key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert made.public_key_line.startswith("ecdsa-sha2-nistp384 ")
    assert load_ssh_public_key(made.public_key_line.encode()).curve.name == "secp384r1"
    assert made.data.counts == {name: 6 for name in made.data.counts} and len(made.data.counts) == 3
    assert (tmp_path / "node" / "ca.crt").read_bytes() == ca.read_bytes()
    command = supernode_command(made.node_file)
    assert command[command.index("--node-config") + 1] == f"config-file='{path}'"
    assert command[command.index("--superlink") + 1] == "fedfew.example.org:9092"


def test_a_missing_cap_is_refused_with_no_file_written(tmp_path, ca, data):
    with pytest.raises(NodeConfigError, match=r"no privacy cap given: pass --budget-epsilon"):
        provision(tmp_path, ca, data, budget_epsilon=None)
    assert not (tmp_path / "node").exists()


def test_a_missing_ca_names_where_to_get_it(tmp_path, data):
    with pytest.raises(CertificateError, match=r"does not exist: copy the federation's ca.crt"):
        provision(tmp_path, tmp_path / "nope.crt", data)


def test_a_server_certificate_given_as_ca_is_refused(tmp_path, ca, data):
    server, _ = make_server_certificate(
        tmp_path / "server", ca_cert=ca, ca_key=ca.with_name("ca.key"), hosts=["127.0.0.1"]
    )
    with pytest.raises(CertificateError, match=r"is not a CA certificate .* not the SuperLink's"):
        provision(tmp_path, server, data)


def test_a_file_that_is_no_certificate_is_refused(tmp_path, data):
    bogus = tmp_path / "ca.crt"
    bogus.write_text("hello\n")
    with pytest.raises(CertificateError, match=r"is not a PEM certificate"):
        provision(tmp_path, bogus, data)


def test_an_expired_certificate_is_refused(tmp_path, ca, data):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired, _ = make_server_certificate(
        tmp_path / "old",
        ca_cert=ca,
        ca_key=ca.with_name("ca.key"),
        hosts=["127.0.0.1"],
        validity_days=10,
        not_valid_before=past,
    )
    with pytest.raises(CertificateError, match=r"expired on .* ask the federation operator"):
        provision(tmp_path, expired, data)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", r"does not exist: give the site's training set"),
        (lambda root: _mkdir(root / "empty"), r"is empty: copy the site's training set there"),
        (lambda root: _one_class(root), r"holds 1 class\(es\) .* at least 2 classes"),
        (lambda root: _bad_images(root), r"1 of 3 images are unreadable .* fix or remove them"),
    ],
    ids=["missing", "empty", "one-class", "unreadable-image"],
)
def test_bad_data_paths_name_the_fix(tmp_path, ca, make, message):
    with pytest.raises(DataError, match=message):
        provision(tmp_path, ca, make(tmp_path))
    assert not (tmp_path / "node" / "node.toml").exists()


def test_a_delta_too_large_for_the_number_of_patients_is_refused(tmp_path, ca, data):
    with pytest.raises(NodeConfigError, match=r"--budget-delta 0.2 is not below 1/9 "):
        provision(tmp_path, ca, data, budget_delta=0.2)  # 18 images of 9 patients


def test_bad_site_names_and_addresses_are_refused(tmp_path, ca, data):
    with pytest.raises(ProvisioningError, match=r"site name '\.\./x'"):
        provision(tmp_path, ca, data, site="../x")
    with pytest.raises(ProvisioningError, match=r"'https://x:1' is not HOST:PORT"):
        provision(tmp_path, ca, data, superlink="https://x:1")


def test_init_twice_is_refused_and_names_rotate_key(tmp_path, ca, data):
    provision(tmp_path, ca, data)
    with pytest.raises(ProvisioningError, match=r"already exists.*fedfew node rotate-key"):
        provision(tmp_path, ca, data)


def test_node_run_checks_pass_on_a_fresh_node(tmp_path, ca, data):
    path = provision(tmp_path, ca, data)
    assert check_node_file(path).node.site_id == "hospital-a"


def test_node_run_refuses_a_file_without_cap(tmp_path, ca, data):
    path = provision(tmp_path, ca, data)
    path.write_text(path.read_text().replace("budget-epsilon = 8.0\n", ""))
    with pytest.raises(NodeConfigError, match=r"has no budget-epsilon.*there is no default"):
        check_node_file(path)


def test_node_run_refuses_an_expired_ca(tmp_path, ca, data):
    path = provision(tmp_path, ca, data)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(CertificateError, match=r"expired on"):
        check_node_file(path, now=later)


def test_node_run_refuses_a_missing_key_and_missing_data(tmp_path, ca, data):
    path = provision(tmp_path, ca, data)
    key = read_node_file(path).connection.key
    key.rename(key.with_name("moved"))
    with pytest.raises(ProvisioningError, match=r"node key .* does not exist: run `fedfew node"):
        check_node_file(path)
    key.with_name("moved").rename(key)
    data.unlink()
    with pytest.raises(DataError, match=r"does not exist: mount or copy the site's training"):
        check_node_file(path)


def test_node_run_refuses_a_cap_unlike_the_ledger(tmp_path, ca, data):
    path = provision(tmp_path, ca, data)
    path.write_text(path.read_text().replace("budget-epsilon = 8.0", "budget-epsilon = 80.0"))
    with pytest.raises(NodeConfigError, match=r"records budget-epsilon 8.0 .* says 80.0"):
        check_node_file(path)


def test_rotate_key_retires_the_old_pair(tmp_path, ca, data):
    path = provision(tmp_path, ca, data)
    old = read_node_file(path).connection.public_key.read_text()
    connection = rotate_node_key(path)
    assert connection.public_key.read_text() != old
    retired = list((connection.key.parent / "retired").iterdir())
    assert sorted(p.name.split(".")[0] for p in retired) == ["hospital-a", "hospital-a"]
    check_node_file(path)


def test_server_init_writes_certificates_config_app_and_run_config(tmp_path):
    server = init_server(tmp_path / "server", hosts=["fedfew.example.org"], port=9300)
    assert server == read_server_file(tmp_path / "server" / "server.toml")
    certificate = x509.load_pem_x509_certificate(server.server_cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"fedfew.example.org", "127.0.0.1", "localhost"}
    assert check_server_file(server.path) == server
    app = tomllib.loads((server.app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "federation.server_app:app",
        "clientapp": "federation.client_app:app",
    }
    values = run_config_values(server)
    assert ServerConfig.from_run_config(values).root == server.database.parent / "server"
    command = superlink_command(server)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in command
    assert command[command.index("--database") + 1] == str(server.database)
    assert command[command.index("--ssl-certfile") + 1] == str(server.server_cert)
    assert command[command.index("--port") + 1] == "9300"
    home = (server.flwr_home / "config.toml").read_text()
    assert 'address = "127.0.0.1:9300"' in home


def test_server_init_twice_is_refused(tmp_path):
    init_server(tmp_path / "server")
    with pytest.raises(ProvisioningError, match=r"already holds a server.*renew-cert"):
        init_server(tmp_path / "server")


def test_run_config_rejects_unknown_keys_and_bad_values(tmp_path):
    server = init_server(tmp_path / "server")
    with pytest.raises(ProvisioningError, match=r"unknown run config key.*num-round"):
        run_config_values(server, {"num-round": 1})
    with pytest.raises(ValueError, match=r"min-replies cannot exceed min-nodes"):
        run_config_values(server, {"min-replies": 5, "min-nodes": 2})


def test_an_expired_server_certificate_names_renew_cert_and_renewal_works(tmp_path):
    server = init_server(tmp_path / "server")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=200)
    renew_server_certificate(server.path, validity_days=100)
    with pytest.raises(
        CertificateError, match=r"server certificate .* expired on .* run `fedfew server renew-cert"
    ):
        check_server_file(server.path, now=later)
    renew_server_certificate(server.path, validity_days=300)
    check_server_file(server.path, now=later)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _images(root: Path, classes: tuple[str, ...]) -> Path:
    folder = root / "images"
    for name in classes:
        (folder / name).mkdir(parents=True)
        pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name / "case-1.png")
    return folder


def _one_class(root: Path) -> Path:
    return _images(root, ("benign",))


def _bad_images(root: Path) -> Path:
    folder = _images(root, ("benign", "malignant"))
    (folder / "malignant" / "case-2.png").write_bytes(b"not a png")
    return folder


def test_node_init_gives_the_clientapp_the_node_key_and_rotation_keeps_it_valid(tmp_path, ca, data):
    path = provision(tmp_path, ca, data)
    node_file = read_node_file(path)

    assert node_file.node.node_key == node_file.connection.key  # signs the ledger heads
    rotate_node_key(path)
    assert read_node_file(path).node.node_key.is_file()  # the new key, at the same path


def test_node_init_writes_only_the_policy_keys_it_knows(tmp_path, ca, data):
    with pytest.raises(ProvisioningError, match="budget-epsilon is not a policy key"):
        provision(tmp_path, ca, data, policy={"budget-epsilon": 80.0})
    with pytest.raises(NodeConfigError, match="max-sample-rate"):
        provision(tmp_path, ca, data, policy={"max-sample-rate": 1.5})
    assert not (tmp_path / "node").exists()

    node = read_node_file(provision(tmp_path, ca, data, policy={"min-noise": 1.2})).node

    assert node.min_noise == 1.2 and node.max_sample_rate == NodeConfig.max_sample_rate
