"""``python -m stepline.approvals``: run the approvals service."""

from stepline.approvals.config import ApprovalsSettings
from stepline.approvals.server import serve
from stepline.common.main import run_service


def main() -> None:
    run_service("approvals", ApprovalsSettings.from_env, serve)


if __name__ == "__main__":
    main()
