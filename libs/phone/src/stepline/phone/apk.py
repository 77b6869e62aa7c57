"""The simulated phone's "APK" format.

A simulated APK is a zip archive holding ``stepline-package.json``::

    {"package": "com.example.app", "version": "1.2", "activity": ".MainActivity"}

``package`` is required (a Java-style package name), ``version`` defaults to
``"1"`` and ``activity`` to ``".MainActivity"``. ``pm install`` on the phone
reads this file; anything else is refused as ``INSTALL_PARSE_FAILED_NOT_APK``.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass

MANIFEST = "stepline-package.json"
_PACKAGE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)+$")


class ApkError(ValueError):
    """The bytes are not a simulated APK."""


@dataclass(frozen=True)
class ApkInfo:
    package: str
    version: str = "1"
    activity: str = ".MainActivity"


def build_apk(package: str, version: str = "1", *, activity: str = ".MainActivity") -> bytes:
    """A simulated APK for ``package`` that ``pm install`` (and ``d.install``) accept."""
    if not _PACKAGE_RE.match(package):
        raise ValueError(f"not a package name: {package!r} (expected e.g. com.example.app)")
    manifest = {"package": package, "version": str(version), "activity": activity}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, sort_keys=True))
        archive.writestr("classes.dex", b"dex\n035\x00stepline simulated app\n")
    return buffer.getvalue()


def read_apk(data: bytes) -> ApkInfo:
    """Parse a simulated APK; ApkError saying what is wrong otherwise."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            manifest = json.loads(archive.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise ApkError(f"not a simulated apk ({MANIFEST} missing or invalid: {exc})") from exc
    if not isinstance(manifest, dict):
        raise ApkError(f"{MANIFEST} must hold a JSON object")
    package = manifest.get("package")
    if not isinstance(package, str) or not _PACKAGE_RE.match(package):
        raise ApkError(f"{MANIFEST}: 'package' must be a package name, got {package!r}")
    version = str(manifest.get("version", "1"))
    activity = manifest.get("activity", ".MainActivity")
    if not isinstance(activity, str) or not activity:
        raise ApkError(f"{MANIFEST}: 'activity' must be a non-empty string")
    return ApkInfo(package=package, version=version, activity=activity)
