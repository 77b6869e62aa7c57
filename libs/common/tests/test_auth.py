"""The auth file: principals by token digest, and by id."""

from __future__ import annotations

from pathlib import Path

from stepline.common.auth import Authenticator, Principal


def test_principals_by_id_merge_the_roles_of_one_id(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    Authenticator.write_file(
        path,
        [
            ("token-a", Principal("alice", frozenset({"operator"}))),
            ("token-b", Principal("alice", frozenset({"approver"}))),
            ("token-c", Principal("ci", frozenset({"service"}))),
        ],
    )
    authenticator = Authenticator.from_file(path)
    assert authenticator.principals_by_id() == {
        "alice": Principal("alice", frozenset({"operator", "approver"})),
        "ci": Principal("ci", frozenset({"service"})),
    }
    assert authenticator.authenticate([("authorization", "Bearer token-b")]).roles == {"approver"}
