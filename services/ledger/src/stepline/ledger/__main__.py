"""``python -m stepline.ledger``: run the ledger service."""

from stepline.common.main import run_service
from stepline.ledger.config import LedgerSettings
from stepline.ledger.server import serve


def main() -> None:
    run_service("ledger", LedgerSettings.from_env, serve)


if __name__ == "__main__":
    main()
