"""``server.model_repo``: versions, roles kept across restarts, the append-only audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.hashing import file_sha256
from server.model_repo import AUDIT_FILE, STATE_FILE, AuditEntry, ModelRepository, RepositoryError, Roles


def make_repo(root: Path, versions: dict[str, str]) -> Path:
    """A repository folder with one tiny file per version (``{version: suffix}``)."""
    for version, suffix in versions.items():
        (root / version).mkdir(parents=True)
        (root / version / f"model{suffix}").write_bytes(f"model {version}".encode())
    return root


def test_versions_in_natural_order_and_the_newest_is_production(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {"2": ".onnx", "10": ".onnx", "9": ".pt"})
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()
    repo = ModelRepository.open(root)
    assert repo.versions() == ["2", "9", "10"]
    assert repo.roles == Roles(production="10")
    assert json.loads((root / STATE_FILE).read_text()) == {"production": "10", "candidate": None, "history": []}
    assert repo.model_file("9") == root / "9" / "model.pt"


def test_roles_survive_a_restart(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {"1": ".onnx", "2": ".onnx"})
    ModelRepository.open(root).set_roles(Roles(production="1", candidate="2", history=("2",)))
    assert ModelRepository.open(root).roles == Roles(production="1", candidate="2", history=("2",))
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")], "the atomic write leaves no temporary file"


@pytest.mark.parametrize("state, problem", [
    ("{not json", "not JSON"),
    ('{"production": "1", "candidate": null}', "expected keys"),
    ('{"production": "1", "candidate": null, "history": [], "extra": 1}', "expected keys"),
    ('{"production": "7", "candidate": null, "history": []}', "'7' is not in the repository"),
    ('{"production": "../1", "candidate": null, "history": []}', "version '../1'"),
])
def test_a_bad_state_file_is_refused_naming_it(tmp_path: Path, state: str, problem: str) -> None:
    root = make_repo(tmp_path / "repo", {"1": ".onnx"})
    (root / STATE_FILE).write_text(state)
    with pytest.raises(RepositoryError, match=problem):
        ModelRepository.open(root)


def test_bad_repositories_and_versions(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no such folder"):
        ModelRepository.open(tmp_path / "missing")
    (tmp_path / "bare").mkdir()
    with pytest.raises(RepositoryError, match="no version folder"):
        ModelRepository.open(tmp_path / "bare")
    root = make_repo(tmp_path / "repo", {"1": ".onnx"})
    (root / "1" / "model.pt").write_bytes(b"x")
    (root / "2").mkdir()
    repo = ModelRepository.open(root)
    with pytest.raises(RepositoryError, match="several model files"):
        repo.model_file("1")
    with pytest.raises(RepositoryError, match="holds no model file"):
        repo.model_file("2")
    with pytest.raises(RepositoryError, match="version '../etc'"):
        repo.model_file("../etc")
    assert repo.sha256("2") == ""


def test_audit_log_is_appended_and_read_back(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", {"1": ".onnx", "2": ".onnx"})
    repo = ModelRepository.open(root)
    first = AuditEntry.now("load", "2", repo.sha256("2"), "CN=admin", "ok")
    second = AuditEntry.now("promote", "3", "", "token", "refused", "no such version")
    repo.record(first)
    reopened = ModelRepository.open(root)
    reopened.record(second)
    assert reopened.audit() == [first, second]
    assert repo.audit(last=1) == [second] and repo.audit(last=0) == []
    assert first.sha256 == file_sha256(root / "2" / "model.onnx")
    lines = (root / AUDIT_FILE).read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["load", "promote"]
    with pytest.raises(ValueError, match="outcome"):
        AuditEntry.now("load", "1", "", "x", "maybe")


def test_a_model_file_is_a_repository_of_one(tmp_path: Path) -> None:
    model = tmp_path / "line.onnx"
    model.write_bytes(b"x")
    repo = ModelRepository.of_file(model)
    assert repo.versions() == ["line.onnx"] and repo.roles.production == "line.onnx"
    assert repo.model_file("line.onnx") == model
    with pytest.raises(RepositoryError, match="--model-repo"):
        repo.model_file("2")
    entry = AuditEntry.now("start", "line.onnx", repo.sha256("line.onnx"), "server", "ok")
    repo.record(entry)
    assert repo.audit() == [entry]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.onnx"], "nothing is written beside a bare file"
