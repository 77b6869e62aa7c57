"""Signing secrets, by name, from ``STEPLINE_APPROVALS_SECRETS_FILE``.

The file is JSON: ``{"secrets": {"<name>": "<value>", ...}}``. Subscriptions and
the inbound endpoint refer to secrets by name only; values stay in this
object, which never shows them in its ``repr``, in errors or in logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stepline.common.errors import ConfigError


class SecretStore:
    """Secret values by name."""

    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        self._secrets = dict(secrets or {})

    @classmethod
    def from_file(cls, path: Path | None) -> SecretStore:
        """Load ``path``; no path means no secrets."""
        if path is None:
            return cls()
        try:
            document: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            # The message of a JSON error quotes no content, only the position.
            raise ConfigError(f"secrets file {str(path)!r} is unreadable: {exc}") from None
        secrets = document.get("secrets") if isinstance(document, dict) else None
        if not isinstance(secrets, dict):
            raise ConfigError(f"secrets file {str(path)!r} needs a 'secrets' object")
        for name, value in secrets.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"secrets file {str(path)!r}: secret {name!r} must be a non-empty string"
                )
        return cls(secrets)

    def __contains__(self, name: object) -> bool:
        return name in self._secrets

    def get(self, name: str) -> str | None:
        return self._secrets.get(name)

    def names(self) -> list[str]:
        return sorted(self._secrets)

    def __repr__(self) -> str:
        return f"SecretStore(names={self.names()!r})"
