"""The single-stream loopback bound as the issue tracker and users quote it: iperf3.

``loopback_gb_per_s`` runs ``iperf3 -s -1`` and ``iperf3 -c 127.0.0.1`` (one TCP stream, its
default 128 KiB writes) for a second or two and returns the receiver's rate in GB/s (1e9 bytes/s),
or None where iperf3 is not installed. It is what the machine's loopback does for one stream with
C on both ends; the Python ``bench.raw_tcp`` bound is what Python on both ends does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

from bench.redis_peer import free_port


def loopback_gb_per_s(seconds: float = 1.0) -> float | None:
    """iperf3's one-stream loopback throughput in GB/s; None without iperf3."""
    iperf3 = shutil.which("iperf3")
    if iperf3 is None:
        return None
    port = free_port()
    server = subprocess.Popen(
        [iperf3, "-s", "-1", "-p", str(port), "-B", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # A probe connection would count as the server's one test: retry the client instead
        # until the server listens (milliseconds).
        for _ in range(50):
            out = subprocess.run(
                [iperf3, "-c", "127.0.0.1", "-p", str(port), "-t", f"{max(seconds, 1.0):g}", "-J"],
                capture_output=True,
                text=True,
                timeout=seconds + 30,
            )
            # iperf3 -J may exit 0 with {"error": ...}: "refused" means not listening yet.
            result = json.loads(out.stdout) if out.stdout.strip() else {}
            if "refused" not in str(result.get("error", "")) or server.poll() is not None:
                break
            time.sleep(0.05)
        if "error" in result or out.returncode != 0:
            return None
        bits = float(result["end"]["sum_received"]["bits_per_second"])
        return bits / 8e9
    except (subprocess.TimeoutExpired, ValueError, KeyError):
        return None
    finally:
        server.kill()
        server.wait()
