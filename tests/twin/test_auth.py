"""Bearer tokens: stored hashed, checked by role, and no service beyond loopback without them."""

import json
import os
import stat

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from deploy.cli import app as cli
from twin.auth import AuthError, TokenStore, check_bind, create_token, revoke_token, role_dependency


def test_token_is_stored_hashed_and_identifies_its_holder(tmp_path):
    path = tmp_path / "tokens.json"
    token = create_token(path, role="operator", name="alice")
    text = path.read_text()
    assert token not in text and token.split("_", 2)[2] not in text  # neither the token nor its secret
    # (mw_<id>_<secret>: the secret is URL-safe base64 and may itself hold "_")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    identity = TokenStore.load(path).identify(token)
    assert (identity.name, identity.role) == ("alice", "operator")
    assert identity.allows("viewer") and identity.allows("operator") and not identity.allows("admin")
    assert TokenStore.load(path).identify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert TokenStore.load(path).identify("Bearer nonsense") is None


def test_revoked_token_no_longer_identifies(tmp_path):
    path = tmp_path / "tokens.json"
    token = create_token(path, role="admin", name="root")
    keep = create_token(path, role="viewer", name="v")
    assert revoke_token(path, token.split("_")[1])
    store = TokenStore.load(path)
    assert store.identify(token) is None and store.identify(keep).role == "viewer"


@pytest.mark.parametrize("content", ["not json", json.dumps({"tokens": [{"id": "x", "role": "god"}]}),
                                     json.dumps([1, 2])])
def test_malformed_token_file_is_refused_with_a_reason(tmp_path, content):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(AuthError, match="token file"):
        TokenStore.load(path)


def test_no_bind_beyond_loopback_without_authentication(tmp_path):
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(AuthError, match="loopback only"):
            check_bind(host, None)
        check_bind(host, tmp_path / "tokens.json")


def test_roles_on_routes(tmp_path):
    path = tmp_path / "tokens.json"
    viewer, operator = create_token(path, role="viewer", name="v"), create_token(path, role="operator", name="o")
    store = TokenStore.load(path)
    app = FastAPI()

    @app.post("/ack")
    def ack(identity=Depends(role_dependency(store, "operator"))):
        return {"by": identity.name}

    client = TestClient(app)
    assert client.post("/ack").status_code == 401
    assert client.post("/ack").headers["www-authenticate"] == "Bearer"
    assert client.post("/ack", headers={"Authorization": f"Bearer {viewer}"}).status_code == 403
    answer = client.post("/ack", headers={"Authorization": f"Bearer {operator}"})
    assert answer.status_code == 200 and answer.json() == {"by": "o"}


def test_cli_prints_the_token_once_and_refuses_bad_roles(tmp_path):
    path = tmp_path / "tokens.json"
    result = CliRunner().invoke(cli, ["auth", "token", "--role", "viewer", "--file", str(path), "--name", "ops"])
    assert result.exit_code == 0
    token = result.stdout.strip()
    assert TokenStore.load(path).identify(token).role == "viewer"
    bad = CliRunner().invoke(cli, ["auth", "token", "--role", "root", "--file", str(path)])
    assert bad.exit_code == 2 and "role must be one of" in bad.output and "Traceback" not in bad.output
