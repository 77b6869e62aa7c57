"""``python -m stepline.phone --port P``: run one simulated phone until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from stepline.phone.model import PhoneModel
from stepline.phone.server import PhoneServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stepline.phone",
        description="A simulated Android phone that the adb server can `adb connect` to.",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--model", default="Pixel 7", help="ro.product.model")
    parser.add_argument("--serial-name", default=None, help="ro.serialno (default: random)")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    model = PhoneModel(model=args.model)
    if args.serial_name:
        model.serial_name = args.serial_name
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        phone = PhoneServer(model, host=args.host, port=args.port).start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"listening on {phone.address}", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        phone.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
