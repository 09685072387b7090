"""Grayroute's load harness.

`make bench` (``python -m benchmarks.run``) starts fast upstreams, the Nginx + Lua
baseline and ``grayroute serve`` side by side and measures them in one interleaved run;
see docs/benchmarks.md. The other modules are tools for the same purpose:

    backends.py      fast upstreams answering their version name (Python or nginx)
    harness.py       process control, config rendering, routing checks, wrk runs
    nginx/           the Nginx + Lua baseline (router.conf.in, router.lua) and nginx upstreams
    wrk/             wrk scripts: workloads (a) and (b), the open-loop fixed-rate script
    rules.yaml       the Grayroute rule file equivalent to the baseline
    run.py           the runner behind `make bench`
    decide_bench.py  decide() micro-benchmark
    idle_conns.py    worker memory with 10,000 idle keep-alive connections
    lua_bench.py     what a Lua route costs against the same rule written natively
    locustfile.py    QA load with a split check at the end
"""
