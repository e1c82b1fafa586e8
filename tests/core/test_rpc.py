"""fse.core.rpc without a worker: addresses, the loopback rule, reading the kernel's
TCP table (a worker that closed the daemon's connection)."""

from __future__ import annotations

import socket

import pytest
from fse.core import rpc
from fse.core.errors import InputError


def test_addresses_and_the_loopback_rule() -> None:
    assert rpc.parse_endpoint("127.0.0.1:50052", "--rpc") == rpc.Endpoint("127.0.0.1", 50052)
    assert rpc.parse_endpoint("::1:50052", "--rpc") == rpc.Endpoint("::1", 50052)
    for bad in ("127.0.0.1", ":50052", "127.0.0.1:0", "127.0.0.1:65536", "[::1]:5", "a:b:5"):
        with pytest.raises(InputError, match=r"--rpc: .* accepted: HOST:PORT"):
            rpc.parse_endpoint(bad, "--rpc")
    for host in ("127.0.0.1", "127.9.9.9", "::1", "localhost"):
        assert rpc.is_loopback(host)
    for host in ("10.8.0.2", "0.0.0.0", "::", "example.org", "localhost.example.org"):
        assert not rpc.is_loopback(host)
    with pytest.raises(InputError, match=r"model\.rpc: 10\.8\.0\.2:1 is not a loopback address"):
        rpc.check_endpoints(["10.8.0.2:1"], allow_remote=False, key="model.rpc", allow="x")
    assert rpc.check_endpoints(["10.8.0.2:1"], allow_remote=True, key="k", allow="x") == [
        rpc.Endpoint("10.8.0.2", 1)
    ]


def test_proc_net_tcp_addresses() -> None:
    assert rpc._peer_of("0100007F:C350") == ("127.0.0.1", 50000)
    # tcp6: four host-order words; an IPv4-mapped peer is given as IPv4.
    assert rpc._peer_of("0000000000000000FFFF00000100007F:0050") == ("127.0.0.1", 80)
    assert rpc._peer_of("00000000000000000000000001000000:01BB") == ("::1", 443)


def test_a_peer_that_closed_our_connection_is_seen() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        ep = rpc.Endpoint("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port)) as ours:
            peer, _ = server.accept()
            assert rpc.closed_by_worker([ep]) == []  # open both ways
            peer.close()  # the "worker" goes away; our side is now CLOSE_WAIT
            ours.settimeout(5)
            assert ours.recv(1) == b""
            assert rpc.closed_by_worker([ep]) == [str(ep)]
            assert rpc.closed_by_worker([rpc.Endpoint("127.0.0.1", port + 1)]) == []
        assert rpc.closed_by_worker([ep]) == []  # closed on our side too
