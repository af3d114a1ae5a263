"""The Celery side of bench/jobs.sh: a no-op task (result ignored) on the test RabbitMQ.

    python3 celery_noop.py enqueue N     # publish N tasks, print tasks/s
    celery -A celery_noop worker ...     # drain them (started by bench/jobs.sh)

Settings come from LRBENCH_AMQP_URL and LRBENCH_QUEUE.
"""
import os
import sys
import time

from celery import Celery

app = Celery("lrbench", broker=os.environ["LRBENCH_AMQP_URL"])
app.conf.update(
    task_ignore_result=True,
    task_default_queue=os.environ["LRBENCH_QUEUE"],
    broker_connection_retry_on_startup=True,
)


@app.task(ignore_result=True)
def noop():
    """Does nothing."""


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "enqueue":
    n = int(sys.argv[2])
    started = time.monotonic()
    for _ in range(n):
        noop.delay()
    print(f"{n / (time.monotonic() - started):.0f}")
