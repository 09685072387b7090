"""The release console: one page on the admin address where a release manager sees each
route's versions side by side (configured, effective and observed share, requests/s,
errors, latency), the rollout and its verdicts, the endpoints' health, the pins, and the
rules in force, and acts on the rollout.

    samples.py   the supervisor's bounded ring of per-interval samples of the workers'
                 summed totals, and the marks (reloads, weight changes)
    status.py    Console: the JSON the page reads, built from the rules in force, the
                 effective state and the ring
    where.py     "where does user X go, and why?", answered by router.explain
    web.py       the admin app's routes: the page, its assets, the JSON endpoints
    static/      the page (HTML, CSS, JavaScript) and uPlot, shipped as package data

Nothing here runs per request: the console reads what router.metrics already counts.
"""

from router.console.status import Console, ConsoleSource

__all__ = ["Console", "ConsoleSource"]
