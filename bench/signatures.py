"""Time fairu's Ed25519 operations alone: a job's check, a result's signature, the
check in two threads at once, and the whole check of a job that carries a certificate.

    .venv/bin/python bench/signatures.py [--count 4000]

The message is a signed job of the control-plane benchmark's size. The two-thread run
shows whether cryptography releases the GIL during the check: two threads take half
the wall time of one when it does and the machine has two free cores. The certified
job is checked by `verify_job_envelope` twice: with a new trust view for each call,
which verifies the certificate every time, and with one view that keeps it.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from datetime import timedelta

from fairu.protocol.models import utc_now
from fairu.protocol.signing import generate_private_key
from fairu.protocol.trust import TrustView, issue_certificate, sign_job, verify_job_envelope

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

    root = generate_private_key()
    now = utc_now()
    certificate = issue_certificate(
        root, public, now - timedelta(minutes=5), now + timedelta(hours=1)
    )
    envelope = sign_job(message, key, certificate)
    shared_view = TrustView(root_key=root.public_key())

    def verify_certified_new_view() -> None:
        verify_job_envelope(envelope, TrustView(root_key=root.public_key()))

    def verify_certified_kept_view() -> None:
        verify_job_envelope(envelope, shared_view)

    verify_s, sign_s, threaded_s, new_view_s, kept_view_s = [], [], [], [], []
    for _ in range(args.rounds):
        verify_s.append(time_calls(verify, args.count))
        sign_s.append(time_calls(sign, args.count))
        threaded_s.append(two_threads(verify, args.count))
        new_view_s.append(time_calls(verify_certified_new_view, args.count))
        kept_view_s.append(time_calls(verify_certified_kept_view, args.count))
    single_thread_s = statistics.median(verify_s)
    print(f"{args.count} calls per measurement, {MESSAGE_BYTES}-byte message, "
          f"medians of {args.rounds} rounds")
    print(f"check (verify)   {single_thread_s / args.count * 1e6:6.1f} us per call")
    print(f"signature (sign) {statistics.median(sign_s) / args.count * 1e6:6.1f} us per call")
    threaded_rate = single_thread_s / statistics.median(threaded_s)
    print(f"check in 2 threads: {threaded_rate:.2f} times the rate of one")
    new_view = statistics.median(new_view_s) / args.count * 1e6
    kept_view = statistics.median(kept_view_s) / args.count * 1e6
    print(f"certified job, new trust view  {new_view:6.1f} us per call")
    print(f"certified job, kept trust view {kept_view:6.1f} us per call "
          f"({new_view / kept_view:.2f} times faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
