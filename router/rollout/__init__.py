"""Progressive rollout: the router judges a route's canary against its stable version on
the split traffic it routes, and drives the canary's weight step by step, or back to 0.

    stats.py       per-version counts (requests, failures, a fixed-bucket latency
                   histogram), summed over workers; where the controller gets them
    gates.py       pure: one interval's counts in, PASS / FAIL / NODATA out
    controller.py  steps, phases and actions, decided by pure code; a thin adapter
                   applies them (weights to the workers, state, audit, notifications)
    state.py       what survives a restart: each rollout's phase, step and history
    notify.py      JSON POSTs on every phase change, off the controller's path
    client.py      `grayroute rollout ...` against the admin API

The contract is docs/rollout.md. Nothing in router/rules/ imports this package.
"""
