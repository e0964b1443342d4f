"""Software simulator of the fabric, and fleet-scale what-ifs (see docs/simulator.md).

``clock`` (virtual time), ``fabric`` (links, faults), ``stream`` (simulated NVMe/TCP byte streams),
``verbs`` (simulated RDMA verbs), ``protocol`` (the real target and initiator on simulated nodes),
``workload`` (LLM serving traffic), ``scenario``, ``cluster`` (analytic mode), ``report``, ``cli``.
"""
