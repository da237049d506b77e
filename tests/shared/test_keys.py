"""Keys that never leave: a site makes its own key pair, private half mode 0600 from the
start; the coordinator's PKI holds no site's private key unless asked to for tests."""

import stat

from fedclif.cli import main


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_site_keygen_makes_a_private_key_that_stays(tmp_path, capsys):
    d = tmp_path / "keys"
    assert main(["site", "keygen", "--out", str(d)]) == 0
    key, pub = d / "site.key", d / "site.pub"
    assert _mode(key) == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    before = key.read_bytes()
    capsys.readouterr()
    assert main(["site", "keygen", "--out", str(d)]) == 1  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
    assert key.read_bytes() == before


def test_coordinator_init_holds_no_site_private_key(tmp_path):
    pki = tmp_path / "pki"
    assert main(["coordinator", "init", "--out", str(pki)]) == 0
    assert {p.name for p in pki.iterdir()} == {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert _mode(pki / "ca.key") == _mode(pki / "server.key") == 0o600
    assert not list(pki.rglob("site.key"))
    dev = tmp_path / "dev"
    assert main(["coordinator", "init", "--out", str(dev), "--dev-site-keys", "a,b"]) == 0
    assert _mode(dev / "sites" / "a" / "site.key") == 0o600
    assert (dev / "sites" / "b" / "ca.crt").read_bytes() == (dev / "ca.crt").read_bytes()
