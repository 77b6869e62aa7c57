"""Stepline device broker: leases cloud phones found through adb servers."""

from stepline.device_broker.broker import Broker
from stepline.device_broker.config import DeviceBrokerSettings, HealthThresholds
from stepline.device_broker.server import DeviceBrokerServicer, running, serve

__all__ = [
    "Broker",
    "DeviceBrokerServicer",
    "DeviceBrokerSettings",
    "HealthThresholds",
    "running",
    "serve",
]
