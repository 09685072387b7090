"""The fleet: what several routers share, and what they find out about the pods.

    dns.py        endpoints from DNS: `endpoints: {dns, port, interval}` upstreams looked
                  up by the supervisor and put in force in every worker
"""
