"""The daemon: scheduler, guard service, gRPC servicer and wire translation, listeners,
audit log and the process lifecycle. Imports fse.core; never fse.cli or fse.tools.
"""
