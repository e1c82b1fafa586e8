"""Helpers shared by the test packages, each defined once.

- `daemons`: the `fse` command line, real `fse serve` processes (`Daemon`), their audit
  records and log events, waiting for SERVING.
- `streams`: raw gRPC Generate calls against a daemon (messages, outcomes, live streams).
- `waits`: polling with a liveness bound instead of fixed sleeps.
- `ports`, `users`, `certs`, `notify`, `metrics`, `cli`: free TCP ports, acting as
  another uid, throwaway TLS certificates, systemd's end of $NOTIFY_SOCKET, scraping
  /metrics, and the `fse generate` runs of the CLI tests.

The fixtures (model, ctx, start_daemon, start_module_daemon, launch, ...) live in
tests/conftest.py and tests/<package>/conftest.py.
"""
