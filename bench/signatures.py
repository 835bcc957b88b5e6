"""Time fairu's Ed25519 operations alone: a job's check, a result's signature, and the
check in two threads at once.

    .venv/bin/python bench/signatures.py [--count 4000]

The message is a signed job of the control-plane benchmark's size. The two-thread run
shows whether cryptography releases the GIL during the check: two threads take half
the wall time of one when it does and the machine has two free cores.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from fairu.protocol.signing import generate_private_key

MESSAGE_BYTES = 1500


def time_calls(function, count: int) -> float:
    """Return the wall time of `count` calls of `function`, in seconds."""
    started = time.perf_counter()
    for _ in range(count):
        function()
    return time.perf_counter() - started


def two_threads(function, count: int) -> float:
    """Return the wall time of `count` calls of `function` split over two threads."""
    threads = [
        threading.Thread(target=time_calls, args=(function, count // 2)) for _ in range(2)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are shown")
    args = parser.parse_args()

    key = generate_private_key()
    public = key.public_key()
    message = b"x" * MESSAGE_BYTES
    signature = key.sign(message)

    def verify() -> None:
        public.verify(signature, message)

    def sign() -> None:
        key.sign(message)

    verify_s, sign_s, threaded_s = [], [], []
    for _ in range(args.rounds):
        verify_s.append(time_calls(verify, args.count))
        sign_s.append(time_calls(sign, args.count))
        threaded_s.append(two_threads(verify, args.count))
    one = statistics.median(verify_s)
    print(f"{args.count} calls per measurement, {MESSAGE_BYTES}-byte message, "
          f"medians of {args.rounds} rounds")
    print(f"check (verify)   {one / args.count * 1e6:6.1f} us per call")
    print(f"signature (sign) {statistics.median(sign_s) / args.count * 1e6:6.1f} us per call")
    print(f"check in 2 threads: {one / statistics.median(threaded_s):.2f} times the rate of one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
