import jax
import pytest

from rec_llm.errors import ConfigError
from rec_llm.parallel import mesh as mesh_lib


@pytest.mark.parametrize("sizes,expected", [
    (dict(data=4, tensor=2, pipe=1), (4, 2, 1)),
    (dict(data=-1, tensor=2), (4, 2, 1)),
    (dict(data=2, tensor=-1, pipe=2), (2, 2, 2)),
    (dict(data=1, tensor=1, pipe=-1), (1, 1, 8)),
])
def test_resolve_fills_one_axis(sizes, expected):
  assert mesh_lib.resolve_mesh_shape(sizes, 8) == expected


@pytest.mark.parametrize("sizes,needle", [
    (dict(data=3, tensor=2, pipe=1), "= 6 but there are 8 devices"),
    (dict(data=-1, tensor=-1, pipe=1), "at most one axis may be -1"),
    (dict(data=0, tensor=8, pipe=1), "mesh.data=0 is invalid"),
    (dict(data=-1, tensor=3, pipe=1), "cannot fill mesh.data=-1"),
    (dict(data=8, expert=1), "unknown mesh axis ['expert']"),
])
def test_resolve_rejects_bad_shapes(sizes, needle):
  with pytest.raises(ConfigError) as e:
    mesh_lib.resolve_mesh_shape(sizes, 8)
  assert needle in str(e.value)


def test_build_mesh_axes_and_devices():
  m = mesh_lib.build_mesh(dict(data=2, tensor=4, pipe=1))
  assert m.axis_names == ("data", "tensor", "pipe")
  assert dict(m.shape) == {"data": 2, "tensor": 4, "pipe": 1}
  assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())
  one = mesh_lib.build_mesh(dict(data=1, tensor=1, pipe=1), jax.devices()[:1])
  assert one.devices.size == 1
