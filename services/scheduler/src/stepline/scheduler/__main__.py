"""``python -m stepline.scheduler``: run the scheduler service."""

from stepline.common.main import run_service
from stepline.scheduler.config import SchedulerSettings
from stepline.scheduler.server import serve


def main() -> None:
    run_service("scheduler", SchedulerSettings.from_env, serve)


if __name__ == "__main__":
    main()
