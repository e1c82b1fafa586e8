"""`fse rpc-worker`: serve this host's devices to a daemon over ggml's RPC (docs/rpc.md).

ggml's RPC server runs in this process (fse.core.rpc.start_server) on a daemon thread;
the main thread waits for SIGTERM or SIGINT and exits 0, or exits 1 if the server could
not start (the port is taken). It serves one daemon at a time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from fse.cli.common import EXIT_ERROR, positive
from fse.core.engine import MAX_THREADS
from fse.core.errors import InputError


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "rpc-worker",
        help="serve this host's devices to `fse serve --rpc` (ggml's RPC backend)",
        description="Serve this host's GPUs (else its CPU) to a daemon that splits a model "
        "across hosts (`fse serve --rpc HOST:PORT`). ggml's RPC has no authentication and "
        "no encryption: listen on loopback or on a tunnel's address (docs/rpc.md).",
    )
    p.add_argument(
        "--listen", required=True, metavar="HOST:PORT", help="address to serve on (loopback)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help=f"CPU threads for the CPU device, 1..{MAX_THREADS} (default: all cores)",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="listen on a non-loopback address (a tunnel's: the protocol has no auth)",
    )
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log on stderr")
    p.set_defaults(func=cmd_rpc_worker)


def cmd_rpc_worker(args: argparse.Namespace) -> int:
    from fse.core import rpc
    from fse.core.model import init_backend

    endpoint = rpc.check_endpoints(
        [args.listen], allow_remote=args.allow_remote, key="--listen", allow="--allow-remote"
    )[0]
    threads = args.threads or min(os.cpu_count() or 2, MAX_THREADS)
    positive("--threads", threads, MAX_THREADS)
    if not endpoint.loopback:
        print(
            f"fse rpc-worker: warning: serving on {endpoint}, not loopback: anyone who can "
            "reach it can use this host's devices and read what they compute; keep it on a "
            "tunnel (docs/rpc.md)",
            file=sys.stderr,
            flush=True,
        )
    init_backend(args.verbose)
    served = rpc.served_devices()
    if not served:
        raise InputError("--listen: this host has no device to serve")
    stopped = threading.Event()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

    def serve() -> None:
        try:
            rpc.start_server(endpoint, threads, served)
        finally:
            stopped.set()
            os.kill(os.getpid(), signal.SIGUSR1)  # wake the main thread's sigwait

    names = ", ".join(rpc.device_name(d) for d in served)
    print(
        f"fse rpc-worker: serving {names} on {endpoint} ({threads} threads)",
        file=sys.stderr,
        flush=True,
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    threading.Thread(target=serve, name="fse-rpc-server", daemon=True).start()
    received = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})
    sys.stdout.flush()
    sys.stderr.flush()
    if received == signal.SIGUSR1 or stopped.is_set():
        print(
            f"fse rpc-worker: error: --listen: {endpoint}: ggml's RPC server could not "
            "serve there (address in use or not this host's)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_ERROR)
    # The server thread sits in accept() or serves a client inside ggml: exit without
    # unwinding it (C++ static destructors would free backends it still uses).
    print(f"fse rpc-worker: stopped ({signal.Signals(received).name})", file=sys.stderr, flush=True)
    os._exit(0)
