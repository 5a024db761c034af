"""The recorder addon with its main-thread work timed: the script bench_hook.py runs.

    mitmdump -s benchmarks/timed_recorder.py   # with BENCH_HOOK_OUT=<file> set

The shipped recorder, unchanged, except that the thread CPU time (time.thread_time_ns)
spent in its hooks and in its batch conversions (on a timer, or at shutdown) is added
up; at exit the total and the number of flows go to $BENCH_HOOK_OUT.
$REDIRECT_AUDIT_CONVERT_BATCH=1 converts each flow as its response arrives instead of
in batches.
"""

from __future__ import annotations

import os
import time

import addons.redirect_recorder as shipped

shipped.CONVERT_BATCH = int(os.environ.get("REDIRECT_AUDIT_CONVERT_BATCH", shipped.CONVERT_BATCH))
recorder = shipped.recorder
spent = [0, 0]  # nanoseconds, depth (a hook that converts a full batch is timed once)


def timed(work):
    def run(*args):
        if spent[1]:
            return work(*args)
        spent[1] = 1
        start = time.thread_time_ns()
        try:
            return work(*args)
        finally:
            spent[0] += time.thread_time_ns() - start
            spent[1] = 0

    return run


recorder.convert_pending = timed(recorder.convert_pending)  # the timer and done() find this one
load = recorder.load
configure = recorder.configure
running = recorder.running
response = timed(recorder.response)
error = timed(recorder.error)


def done() -> None:
    flows = 0
    if recorder.recorder is not None:
        recorder.convert_pending()
        flows = recorder.recorder.seen
    recorder.done()
    with open(os.environ["BENCH_HOOK_OUT"], "w") as out:
        out.write(f"{spent[0]} {flows}\n")
