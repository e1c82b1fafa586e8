"""`make bench`: every benchmark in one go, printed as the tables README shows.

Each script can also run alone (see its docstring). Run on a quiet machine:
other processes on the same cores slow llama.cpp's spinning threads far more
than their own share.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_daemon
import bench_engine
import bench_http
import bench_kernel


def main() -> int:
    k = bench_kernel.measure()
    print("## Fused kernel (262,144 logits)\n")
    print("| implementation | µs per call |\n|---|---|")
    print(f"| C kernel | {k['kernel_us']:.1f} |\n| numpy | {k['numpy_us']:.1f} |\n")

    e = bench_engine.measure()
    print("## Engine, single stream (greedy, 2 threads)\n")
    print("| what | tokens/s |\n|---|---|")
    print(f"| guarded engine (`pro`) | {e['guarded_tps']:.1f} |")
    print(f"| engine, `non_finite` only | {e['unguarded_tps']:.1f} |")
    print(f"| llama-bench tg64 | {e['llama_bench_tps']:.1f} |")
    print(f"| guarded / unguarded | {e['guarded_over_unguarded']:.3f} |")
    print(f"| guarded / llama-bench | {e['guarded_over_llama_bench']:.3f} |\n")

    d = bench_daemon.measure()
    print("## Daemon\n")
    print(
        f"single stream through gRPC: {d['single_daemon_tps']:.1f} tok/s, in-process "
        f"{d['single_in_process_tps']:.1f}, ratio {d['single_ratio']:.3f} (median of "
        f"{d['pairs']} pairs); CPU per token: daemon event loop "
        f"{d['daemon_loop_cpu_ms_per_token']:.2f} ms, "
        f"client {d['client_cpu_ms_per_token']:.2f} ms\n"
    )
    agg, ceil, split = d["aggregate_tps"], d["batched_bench_tps"], d["batched_bench_split_kv_tps"]
    ratio = d["aggregate_ratio"]
    assert isinstance(agg, dict) and isinstance(ceil, dict)
    assert isinstance(split, dict) and isinstance(ratio, dict)
    print("| streams | daemon tok/s | llama-batched-bench -kvu | ratio | per-sequence KV |")
    print("|---|---|---|---|---|")
    for p in bench_daemon.PARALLEL:
        print(f"| {p} | {agg[p]:.1f} | {ceil[p]:.1f} | {ratio[p]:.3f} | {split[p]:.1f} |")
    gi, gd = d["gap_ms_in_process"], d["gap_ms_daemon"]
    assert isinstance(gi, dict) and isinstance(gd, dict)
    print(
        f"\ntoken gap p50/p99 ms: in-process {gi['p50']:.2f}/{gi['p99']:.2f}, "
        f"daemon {gd['p50']:.2f}/{gd['p99']:.2f}"
    )
    print(
        f"start to SERVING {d['seconds_to_serving']:.2f} s; peak RSS {d['peak_rss_mib']:.0f} MiB "
        f"(model file {d['model_file_mib']:.0f} MiB + {d['rss_over_model_mib']:.0f} MiB)"
    )
    h = bench_http.measure()
    print("\n## HTTP API against gRPC (streamed, greedy, loopback TCP)\n")
    print("| streams | HTTP tok/s | gRPC tok/s | HTTP / gRPC |\n|---|---|---|---|")
    h_tps, g_tps, h_ratio = h["http_tps"], h["grpc_tps"], h["ratio"]
    assert isinstance(h_tps, dict) and isinstance(g_tps, dict) and isinstance(h_ratio, dict)
    for p in bench_http.PARALLEL:
        print(f"| {p} | {h_tps[p]:.1f} | {g_tps[p]:.1f} | {h_ratio[p]:.3f} |")
    # The standalone benchmarks print their own summaries.
    here = Path(__file__).resolve().parent
    scripts = (
        "bench_server.py",
        "bench_batched.py",
        "bench_handoff.py",
        "bench_prefill.py",
        "bench_oversized.py",
        "bench_audit.py",
    )
    for script in (*scripts, "bench_rpc.py"):
        print(f"\n## {script}", flush=True)
        subprocess.run([sys.executable, str(here / script)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
