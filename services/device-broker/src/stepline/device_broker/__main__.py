"""``python -m stepline.device_broker``: run the device broker service."""

from stepline.common.main import run_service
from stepline.device_broker.config import DeviceBrokerSettings
from stepline.device_broker.server import serve


def main() -> None:
    run_service("device-broker", DeviceBrokerSettings.from_env, serve)


if __name__ == "__main__":
    main()
