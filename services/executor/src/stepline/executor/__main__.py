"""``python -m stepline.executor``: run an executor worker."""

from stepline.common.main import run_service
from stepline.executor.config import ExecutorSettings
from stepline.executor.server import serve


def main() -> None:
    run_service("executor", ExecutorSettings.from_env, serve)


if __name__ == "__main__":
    main()
