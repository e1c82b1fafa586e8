"""The domain: engine, statistics, guards, policies, one guarded stream, model files.

Imports nothing from fse.serve, fse.cli or fse.tools, and nothing of gRPC.
"""
