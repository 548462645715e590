"""``make bench``: embedshim (io.containerd.embed.v1) against io.containerd.runc.v2.

Run as ``python -m integration.bench.bench [--quick] [--out DIR]``; see README.md here.
"""
