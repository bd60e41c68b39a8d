"""For every test process and the worker, CLI and gateway processes they start."""

import os

# One CPU thread per process. The tiny model gains nothing from more, and the suite runs two test processes
# (`make test`), each with worker processes: with torch's default (a thread per core) every process's threads
# spin for cores the others hold, and the suite took twice as long (measured: 258 s against 141 s for two files).
os.environ.setdefault("OMP_NUM_THREADS", "1")
