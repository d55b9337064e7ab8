"""Parallelism that knows no model: meshes, logical sharding rules, collectives.

Everything here works on pytrees, meshes and logical axis names.
"""
