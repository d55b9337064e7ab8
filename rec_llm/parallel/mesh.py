"""Arrange devices into the `data`, `tensor` and `pipe` mesh axes."""

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from rec_llm.errors import ConfigError

MESH_AXES = ("data", "tensor", "pipe")


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Returns (data, tensor, pipe), filling at most one -1 with the devices left over."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"unknown mesh axis {sorted(unknown)}; the mesh axes are {list(MESH_AXES)}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  fills = [a for a, s in zip(MESH_AXES, shape) if s == -1]
  if len(fills) > 1:
    raise ConfigError(f"mesh axes {fills} are all -1; at most one axis may be -1 (fill with the rest)")
  for a, s in zip(MESH_AXES, shape):
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}={s} is invalid; each axis size must be a positive integer or -1")
  known = math.prod(s for s in shape if s != -1)
  if fills:
    if num_devices % known:
      raise ConfigError(
          f"cannot fill mesh.{fills[0]}=-1: the other axes multiply to {known}, which does not "
          f"divide the {num_devices} devices")
    shape[MESH_AXES.index(fills[0])] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(
        f"mesh data*tensor*pipe = {'*'.join(map(str, shape))} = {math.prod(shape)} but there are "
        f"{num_devices} devices; make the product {num_devices} or set one axis to -1")
  return tuple(shape)


def build_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds an Auto-axis (GSPMD-style) mesh with axes (data, tensor, pipe).

  With several processes the `data` axis spans processes (a hybrid mesh: the slow
  links carry only the data-parallel reduction), and `tensor`/`pipe` stay inside a process.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  nproc = len({d.process_index for d in devices})
  if nproc > 1:
    data = shape[0]
    if data % nproc:
      raise ConfigError(
          f"mesh.data={data} must be a multiple of the {nproc} processes: the data axis spans "
          f"processes while tensor and pipe stay inside one")
    per_process = (data // nproc,) + shape[1:]
    grid = mesh_utils.create_hybrid_device_mesh(
        per_process, (nproc, 1, 1), devices, process_is_granule=True)
  elif len(devices) == len(jax.devices()):
    grid = mesh_utils.create_device_mesh(shape, devices)  # topology-aware on TPU/GPU
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
