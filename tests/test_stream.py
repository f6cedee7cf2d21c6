"""The host input pipeline feeds exactly the batches the device path samples."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ggr_jax import ssl
from ggr_jax.data import sampling
from ggr_jax.data.stream import HostStream, _EpochStreams
from ggr_jax.train import config as config_lib, step as step_lib
from tests.test_train import tiny_config


def _split(n_lab=12, n_ulb=40, seed=0):
  rng = np.random.default_rng(seed)
  return {"x_labeled": rng.integers(0, 256, (n_lab, 8, 8, 1), dtype=np.uint8),
          "y_labeled": rng.integers(0, 6, n_lab).astype(np.int32),
          "x_unlabeled": rng.integers(0, 256, (n_ulb, 8, 8, 1), dtype=np.uint8),
          "unlabeled_is_id": rng.random(n_ulb) < 0.5}


@pytest.mark.parametrize("batch, n", [(4, 12), (8, 8), (12, 5), (3, 40)])
def test_host_epoch_stream_equals_the_device_function(batch, n):
  key = jax.random.PRNGKey(7)
  host = _EpochStreams()
  for step in [0, 1, 2, 3, 9, 10, 57]:
    expected = np.asarray(jax.jit(sampling.epoch_stream_indices, static_argnums=(2, 3))(
        key, step, batch, n))
    np.testing.assert_array_equal(host(key, step, batch, n), expected)


@pytest.mark.parametrize("devices", [1, 4])
def test_stream_batches_equal_the_device_gathered_batches(devices):
  if jax.device_count() < devices:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  split, key = _split(), jax.random.PRNGKey(3)
  sizes = {"labeled": 4, "unlabeled": 8, "selected": 4}
  selected = np.arange(40) % 3 == 0
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  counts = {"x_labeled": 12, "x_unlabeled": 40}

  @jax.jit
  def on_device(data, step, mask):
    return sampling.gather_rows(data, sampling.batch_indices(key, step, sizes, counts, mask))

  with HostStream(split, key, sizes, mesh, start_step=5, selected=selected, prefetch=3) as feed:
    for step in range(5, 12):
      streamed, expected = feed.next(step), on_device(split, step, selected)
      assert sorted(streamed) == sorted(expected)
      for name in expected:
        np.testing.assert_array_equal(np.asarray(streamed[name]), np.asarray(expected[name]),
                                      err_msg=name)
        assert streamed[name].sharding.mesh.devices.size == devices
  rows = feed.indices(5, selected)["selected"]
  assert selected[rows].all() and len(set(rows.tolist())) == len(rows)


def test_each_device_receives_its_own_contiguous_rows():
  if jax.device_count() < 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  split = _split()
  split["y_labeled"] = np.arange(12, dtype=np.int32)  # label = row, to read rows back
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  with HostStream(split, jax.random.PRNGKey(0), {"labeled": 8}, mesh, 0) as feed:
    indices = feed.indices(0, None)["labeled"]
    labels = feed.next(0)["y_lb"]
  for shard in labels.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), indices[shard.index[0]])


def test_restart_drops_prefetched_batches_and_uses_the_new_mask():
  split, key = _split(), jax.random.PRNGKey(1)
  sizes = {"labeled": 4, "unlabeled": 4, "selected": 8}
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  first, second = np.zeros(40, bool), np.zeros(40, bool)
  first[:5], second[30:] = True, True
  with HostStream(split, key, sizes, mesh, 0, selected=first, prefetch=4) as feed:
    assert set(feed.indices(0, first)["selected"].tolist()) <= set(range(5))
    feed.next(0)
    feed.restart(1, second)
    rows = np.asarray(feed.next(1)["selected"])
  np.testing.assert_array_equal(rows, split["x_unlabeled"][feed.indices(1, second)["selected"]])
  assert set(feed.indices(1, second)["selected"].tolist()) <= set(range(30, 40))


def test_out_of_order_steps_and_bad_arguments_are_refused():
  split, key = _split(), jax.random.PRNGKey(0)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with HostStream(split, key, {"labeled": 4}, mesh, 0) as feed:
    with pytest.raises(RuntimeError, match="call restart"):
      feed.next(3)
    with pytest.raises(ValueError, match="one flag per unlabeled image"):
      feed.restart(0, np.ones(7, bool))
  with pytest.raises(ValueError, match="prefetch"):
    HostStream(split, key, {"labeled": 4}, mesh, 0, prefetch=0)
  with pytest.raises(ValueError, match="workers"):
    HostStream(split, key, {"labeled": 4}, mesh, 0, workers=-1)
  with pytest.raises(ValueError, match="inlier mask"):
    HostStream(split, key, {"labeled": 4, "selected": 4}, mesh, 0)
  if jax.device_count() >= 8:
    with pytest.raises(ValueError, match="does not split over the 8 devices"):
      HostStream(split, key, {"labeled": 4}, Mesh(np.array(jax.devices()[:8]), ("data",)), 0)


def test_a_failing_gather_surfaces_in_the_training_thread():
  split = _split()
  split["x_unlabeled"] = split["x_unlabeled"][:0]  # no rows to draw from
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with HostStream(split, jax.random.PRNGKey(0), {"unlabeled": 4}, mesh, 0) as feed:
    with pytest.raises(RuntimeError, match="host input pipeline failed"):
      feed.next(0)


def test_close_stops_the_pipeline_threads():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  before = {t.ident for t in threading.enumerate()}
  feed = HostStream(_split(), jax.random.PRNGKey(0), {"labeled": 4}, mesh, 0, prefetch=2)
  feed.next(0)
  feed.close()
  for _ in range(50):
    if not {t.ident for t in threading.enumerate() if t.is_alive()} - before:
      break
    threading.Event().wait(0.05)
  assert not {t.ident for t in threading.enumerate() if t.is_alive()} - before


def test_a_saved_pipeline_state_resumes_at_the_same_batch():
  split, key = _split(), jax.random.PRNGKey(4)
  sizes = {"labeled": 4, "unlabeled": 4, "selected": 4}
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  mask = np.arange(40) % 4 == 1
  with HostStream(split, key, sizes, mesh, 2, selected=mask, prefetch=3) as feed:
    for step in range(2, 6):
      feed.next(step)
    saved = json.loads(json.dumps(feed.state()))  # as the checkpoint stores it
    expected = [feed.next(6), feed.next(7)]
  assert saved["origin"] == 2 and saved["next_step"] == 6
  with HostStream(split, key, sizes, mesh, 6, selected=mask, state=saved) as resumed:
    for step, batch in zip((6, 7), expected):
      got = resumed.next(step)
      for name in batch:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(batch[name]))
  with HostStream(split, key, sizes, mesh, 9, selected=mask, state=saved) as wrong:
    with pytest.raises(RuntimeError, match="delivered step 6 for step 9"):
      wrong.next(9)


def test_grain_worker_processes_feed_the_device_batches():
  split, key = _split(), jax.random.PRNGKey(5)
  sizes = {"labeled": 4, "unlabeled": 8}
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  counts = {"x_labeled": 12, "x_unlabeled": 40}
  on_device = jax.jit(lambda data, step: sampling.gather_rows(
      data, sampling.batch_indices(key, step, sizes, counts, None)))
  with HostStream(split, key, sizes, mesh, 3, workers=2) as feed:
    for step in range(3, 8):
      streamed, expected = feed.next(step), on_device(split, step)
      for name in expected:
        np.testing.assert_array_equal(np.asarray(streamed[name]), np.asarray(expected[name]))


def test_input_mode_is_validated():
  cfg = tiny_config()
  cfg.train.input = "disk"
  with pytest.raises(config_lib.ConfigError, match="train.input = 'disk'"):
    config_lib.validate(cfg, num_devices=1)


def test_step_sizes_follow_the_algorithm_sources():
  assert list(step_lib.source_sizes(tiny_config("openmatch"))) == list(
      ssl.get("openmatch").views)
