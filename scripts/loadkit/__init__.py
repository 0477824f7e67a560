"""scripts/loadtest's body: alertd under load on loopback, measured and reported.

Modules, in the order a run uses them: ``profiles`` (what the load looks
like), ``matrix`` (the runs, probers side by side), ``clips`` (ffmpeg lavfi
clips of a few sizes), ``servers`` (a clip server with latency and a
bandwidth cap, a webhook sink with latency and failures), ``stack`` (a fresh
vhost and database, ``alertd start`` as a subprocess), ``publisher`` (pika
with confirms, a closed-loop window; a fast prefill), ``proctree`` (CPU and
memory from /proc), ``metrics`` (alertd's /metrics), ``run`` (one measured
run), ``noop`` and ``noopalertd`` (a run with adapters that do nothing),
``raw`` (the raw aiormq consumer), ``spyrecord`` and ``spy`` (py-spy during
the window, and its summary), ``spread`` (median and range of ``--repeat``'s
runs), ``compare``, ``report``, ``plots`` and ``meta`` (the results folder),
``main`` (the command line).
"""
