"""`make chaos`: faults injected into real components (processes, dockerd, PostgreSQL, TCP, tmpfs), one table.

Each scenario runs a few jobs on real `jobwire server` / `jobwire worker` processes, injects its fault,
and measures from the outside: the jobs' finish reasons (the server's word), the containers of each
job (dockerd's event stream: create, start, die, destroy, with their labels), and what is left on the
host after the run. `harness.py` holds the measuring and the table, `proxy.py` the TCP proxy that
resets and stalls streams, `scenarios.py` the scenarios.
"""
