"""The one machine-readable readiness line of a grokserve process, also logged.

Supervisors (tests, benchmarks, scripts) wait for `grokserve <role> SERVING on HOST:PORT` on stdout.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def announce_serving(role: str, address: str, detail: str = "") -> str:
    """Print and log `grokserve <role> SERVING on <address> <detail>`; returns the line."""
    line = f"grokserve {role} SERVING on {address}" + (f" {detail}" if detail else "")
    log.info("%s ready on %s %s", role, address, detail)
    print(line, flush=True)
    return line
