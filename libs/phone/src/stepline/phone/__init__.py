"""Stepline's simulated cloud phone: a process that speaks the adb device protocol.

The real adb server (``adb connect host:port``) and adbutils drive it as they
would a phone. See docs/phone.md.
"""

from stepline.phone.apk import build_apk, read_apk
from stepline.phone.model import FAULTS, PhoneModel
from stepline.phone.server import PhoneServer

__all__ = ["FAULTS", "PhoneModel", "PhoneServer", "build_apk", "read_apk"]
