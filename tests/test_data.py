"""Tests for mergejax.data: datasets, splits, transforms and batches."""

import functools
import itertools
import random
import sys

import numpy as np
import pytest

from mergejax import data

SHAPES = {  # name -> (x_train shape, x_test shape) at the default options
    "digits": ((1347, 8, 8, 1), (450, 8, 8, 1)),
    "mnist1d": ((4000, 40), (1000, 40)),
    "gaussian_mixture": ((4000, 16), (1000, 16)),
}
SMALL = {  # name -> options that make a quick load
    "digits": {},
    "mnist1d": {"num_samples": 300},
    "gaussian_mixture": {"n_train": 200, "n_test": 50},
}


@functools.cache
def loaded(name, seed=0, **options):
  return data.load(name, seed=seed, **options)


def small_mixture(seed=0):
  return loaded("gaussian_mixture", seed=seed, n_train=400, n_test=100)


def rows(x):
  """The set of x's examples, each as bytes."""
  return {r.tobytes() for r in np.asarray(x)}


def assert_datasets_equal(a, b):
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def differs(a, b):
  return a.shape != b.shape or not np.array_equal(a, b)


# Datasets.


def test_names():
  assert data.names() == ("digits", "mnist1d", "gaussian_mixture", "stdlib_text")


# The classification datasets (stdlib_text, byte windows, is tested in test_stdlib_text.py).
@pytest.mark.parametrize("name", tuple(SHAPES))
def test_dataset_shapes_dtypes_and_labels(name):
  ds = loaded(name)
  assert ds.name == name
  assert (ds.x_train.shape, ds.x_test.shape) == SHAPES[name]
  assert ds.input_shape == SHAPES[name][0][1:]
  assert ds.num_classes == 10
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert y.shape == x.shape[:1]
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(np.unique(y), np.arange(10))


def test_digits_range_and_test_fraction():
  ds = loaded("digits")
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  half = data.load("digits", test_fraction=0.5)
  assert len(half.y_train) + len(half.y_test) == 1797
  assert abs(len(half.y_test) - 898) <= 1


def test_mnist1d_sizes():
  ds = loaded("mnist1d", num_samples=300)
  assert ds.x_train.shape == (240, 40) and ds.x_test.shape == (60, 40)
  assert abs(ds.x_train.mean()) < 0.2 and 0.7 < ds.x_train.std() < 1.3


def test_gaussian_mixture_options():
  ds = data.load("gaussian_mixture", num_classes=3, dim=5, n_train=31, n_test=7, noise=0.0)
  assert ds.x_train.shape == (31, 5) and ds.x_test.shape == (7, 5) and ds.num_classes == 3
  assert np.bincount(ds.y_train).tolist() == [11, 10, 10]
  # Without noise, every example is its class mean.
  for c in range(3):
    assert len(rows(ds.x_train[ds.y_train == c]) | rows(ds.x_test[ds.y_test == c])) == 1


@pytest.mark.parametrize("name", tuple(SHAPES))
def test_load_is_deterministic_by_seed(name):
  a, b = data.load(name, seed=3, **SMALL[name]), data.load(name, seed=3, **SMALL[name])
  assert_datasets_equal(a, b)
  c = data.load(name, seed=4, **SMALL[name])
  assert differs(a.x_train, c.x_train)


def test_mnist1d_leaves_global_random_state_alone():
  np.random.seed(123)
  random.seed(123)
  np_state, py_state = np.random.get_state(), random.getstate()
  data.load("mnist1d", seed=5, num_samples=100)
  after = np.random.get_state()
  assert np_state[0] == after[0] and np_state[2:] == after[2:]
  np.testing.assert_array_equal(np_state[1], after[1])
  assert random.getstate() == py_state


def test_missing_extra_names_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  with pytest.raises(ImportError, match=r"pip install mergejax\[data\]"):
    data.load("digits")


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("cifar10", {}, "unknown dataset 'cifar10'; valid: digits, mnist1d, gaussian_mixture"),
        ("digits", {"test_frac": 0.3}, "no option.*test_frac.*valid: test_fraction"),
        ("digits", {"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
        ("mnist1d", {"num_samples": 15}, "multiple of 10"),
        ("mnist1d", {"url": "https://example.com"}, "no option.*url"),
        ("mnist1d", {"num_samples": 10, "test_fraction": 0.01}, "empty"),
        ("gaussian_mixture", {"noise": -1.0}, "noise must be >= 0"),
        ("gaussian_mixture", {"n_train": 5}, "n_train"),
        ("gaussian_mixture", {"num_classes": 1}, "num_classes >= 2"),
    ],
)
def test_load_rejects_bad_names_and_options(name, options, match):
  with pytest.raises(ValueError, match=match):
    data.load(name, **options)


# Dataset, Task and relabel.


def test_relabel_and_task_local():
  np.testing.assert_array_equal(data.relabel(np.array([9, 5, 7, 5]), (5, 7, 9)), [2, 0, 1, 0])
  np.testing.assert_array_equal(data.relabel(np.array([9, 5, 7]), (9, 7, 5)), [0, 2, 1])
  with pytest.raises(ValueError, match=r"labels \[3\] are not among classes"):
    data.relabel(np.array([5, 3]), (5, 7))
  task = data.split(small_mixture(), "disjoint_labels")[1]
  local = task.local(task.y_train)
  assert local.dtype == np.int32
  np.testing.assert_array_equal(local, task.y_train - 5)


def test_containers_check_their_arrays():
  x, y = np.zeros((4, 2)), np.array([0, 1, 1, 0])
  with pytest.raises(ValueError, match="one label per example"):
    data.Dataset("bad", x, y[:3], x, y, num_classes=2)
  with pytest.raises(ValueError, match=r"labels outside \[0, 2\)"):
    data.Dataset("bad", x, y + 1, x, y, num_classes=2)
  with pytest.raises(ValueError, match="integers"):
    data.Dataset("bad", x, y * 1.0, x, y, num_classes=2)
  with pytest.raises(ValueError, match="differ in shape"):
    data.Dataset("bad", x, y, x[:, :1], y, num_classes=2)
  with pytest.raises(ValueError, match="labels outside classes"):
    data.Task("bad", x, y, x, y, num_classes=2, classes=(0,))


# Splits.


@pytest.mark.parametrize(
    "kind, options",
    [
        ("disjoint_labels", {}),
        ("imbalanced", {}),
        ("domains", {"transforms": ("identity", "identity", "identity")}),
    ],
)
def test_split_train_sets_are_disjoint_and_cover(kind, options):
  ds = small_mixture()
  everything = rows(ds.x_train)
  assert len(everything) == len(ds.x_train)  # Rows identify examples.
  tasks = data.split(ds, kind, **options)
  parts = [rows(t.x_train) for t in tasks]
  assert sum(len(p) for p in parts) == len(ds.x_train)
  assert set().union(*parts) == everything
  for task in tasks:
    assert isinstance(task, data.Task) and task.num_classes == ds.num_classes
    # Labels travel with their inputs.
    lookup = {r.tobytes(): label for r, label in zip(ds.x_train, ds.y_train)}
    assert all(lookup[r.tobytes()] == label for r, label in zip(task.x_train, task.y_train))


@pytest.mark.parametrize("kind", ["disjoint_labels", "imbalanced", "domains"])
def test_split_is_deterministic_by_seed(kind):
  ds = small_mixture()
  a, b = data.split(ds, kind, seed=1), data.split(ds, kind, seed=1)
  for ta, tb in zip(a, b, strict=True):
    assert ta.name == tb.name and ta.classes == tb.classes
    assert_datasets_equal(ta, tb)
  if kind != "disjoint_labels":
    c = data.split(ds, kind, seed=2)
    assert differs(a[0].x_train, c[0].x_train)


def test_disjoint_labels_tasks_hold_exactly_their_classes():
  ds = small_mixture()
  groups = ((7, 1), (0,), (3, 4, 9))
  tasks = data.split(ds, "disjoint_labels", classes=groups)
  assert [t.classes for t in tasks] == list(groups)
  for task, group in zip(tasks, groups):
    for part in ("train", "test"):
      y, full = getattr(task, f"y_{part}"), getattr(ds, f"y_{part}")
      assert set(y.tolist()) == set(group)
      assert len(y) == np.isin(full, group).sum()
  default = data.split(ds, "disjoint_labels")
  assert [t.classes for t in default] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]


@pytest.mark.parametrize("p", [0.8, 0.65, 1.0])
def test_imbalanced_proportions(p):
  ds = small_mixture()
  a, b = data.split(ds, "imbalanced", p=p)
  counts = [np.bincount(t.y_train, minlength=10) for t in (a, b)]
  total = np.bincount(ds.y_train, minlength=10)
  np.testing.assert_array_equal(counts[0] + counts[1], total)
  expected = np.where(np.arange(10) < 5, p, 1 - p)
  np.testing.assert_allclose(counts[0] / total, expected, atol=0.02)
  for task in (a, b):
    assert task.classes == tuple(range(10))
    np.testing.assert_array_equal(task.x_test, ds.x_test)
    np.testing.assert_array_equal(task.y_test, ds.y_test)


def test_domains_are_transformed_as_requested():
  ds = small_mixture()
  plain = data.split(ds, "domains", seed=3, transforms=("identity", "identity"))
  ident, blurred = data.split(ds, "domains", seed=3)
  assert (ident.name, blurred.name) == ("gaussian_mixture/domains/0+identity",
                                        "gaussian_mixture/domains/1+blur")
  assert rows(ident.x_train) <= rows(ds.x_train)
  assert not rows(blurred.x_train) & rows(ds.x_train)
  # Same seed, same partition: the blurred task is the blur of its part.
  blur_of = data.shift(plain[1], "blur")
  np.testing.assert_array_equal(blurred.x_train, blur_of.x_train)
  np.testing.assert_array_equal(blurred.y_train, plain[1].y_train)
  np.testing.assert_array_equal(blurred.x_test, data.shift(ds, "blur").x_test)
  np.testing.assert_array_equal(ident.x_test, ds.x_test)
  for task in (ident, blurred):
    np.testing.assert_array_equal(task.y_test, ds.y_test)


def test_domains_take_transform_options():
  ds = small_mixture()
  a = data.split(ds, "domains", transforms=("identity", ("noise", {"std": 0.0})))
  b = data.split(ds, "domains", transforms=("identity", "identity"))
  np.testing.assert_array_equal(a[1].x_train, b[1].x_train)
  noisy = data.split(ds, "domains", transforms=(("noise", {"std": 0.5}), ("noise", {"std": 0.5})))
  assert differs(noisy[0].x_test, noisy[1].x_test)  # Each domain draws its own noise.


@pytest.mark.parametrize(
    "kind, options, match",
    [
        ("random", {}, "unknown split 'random'; valid: disjoint_labels, imbalanced, domains"),
        ("disjoint_labels", {"classes": ((0, 1, 2), (2, 3))}, r"classes \[2\] overlap"),
        ("disjoint_labels", {"classes": ((0, 1), (5, 10, 12))}, r"unknown classes \[10, 12\]"),
        ("disjoint_labels", {"classes": ((0, 1), ())}, "non-empty"),
        ("disjoint_labels", {"classes": (0, 1)}, "groups of int labels"),
        ("disjoint_labels", {"classes": ((0.5,),)}, "groups of int labels"),
        ("disjoint_labels", {"p": 0.8}, "no option.*p; valid: classes"),
        ("imbalanced", {"p": 1.5}, r"p must be in \[0, 1\]"),
        ("imbalanced", {"classes": ((0,), (1,))}, "no option.*classes; valid: p"),
        ("domains", {"transforms": ("identity", "sharpen")}, "unknown transform 'sharpen'"),
        ("domains", {"transforms": (("blur", {"radius": 2}),)}, "no option.*radius; valid: sigma"),
        ("domains", {"transforms": ()}, "transforms"),
        ("domains", {"transforms": (3,)}, "name or"),
    ],
)
def test_split_rejects_bad_options(kind, options, match):
  with pytest.raises(ValueError, match=match):
    data.split(small_mixture(), kind, **options)


# Transforms.


def sequences():
  return data.Dataset(
      "seq", np.arange(24.0).reshape(3, 8), np.zeros(3, int), np.ones((2, 8)), np.zeros(2, int), 1
  )


def test_identity_is_exact():
  ds = loaded("digits")
  out = data.shift(ds, "identity")
  assert out.name == "digits+identity"
  assert_datasets_equal(out, ds)


def test_noise():
  ds = loaded("digits")
  assert_datasets_equal(data.shift(ds, "noise", std=0.0), ds)
  a, b = data.shift(ds, "noise", std=0.5, seed=1), data.shift(ds, "noise", std=0.5, seed=1)
  assert_datasets_equal(a, b)
  assert a.x_train.dtype == np.float32
  np.testing.assert_allclose((a.x_train - ds.x_train).std(), 0.5, rtol=0.02)
  np.testing.assert_allclose((a.x_test - ds.x_test).std(), 0.5, rtol=0.05)
  assert differs(a.x_train, data.shift(ds, "noise", std=0.5, seed=2).x_train)


def test_shift_moves_images_by_the_pixels_asked():
  x = np.zeros((2, 6, 6, 1), np.float32)
  x[0, 2, 3, 0] = 1.0
  x[1, 5, 5, 0] = 2.0  # Moves off the image either way.
  ds = data.Dataset("img", x, np.zeros(2, int), x, np.zeros(2, int), 1)
  down_right = data.shift(ds, "shift", pixels=1).x_train
  expected = np.zeros_like(x)
  expected[0, 3, 4, 0] = 1.0
  np.testing.assert_array_equal(down_right, expected)
  up_right = data.shift(ds, "shift", pixels=(-2, 2)).x_test
  expected = np.zeros_like(x)
  expected[0, 0, 5, 0] = 1.0
  np.testing.assert_array_equal(up_right, expected)
  np.testing.assert_array_equal(data.shift(ds, "shift", pixels=6).x_train, np.zeros_like(x))


def test_shift_moves_sequences_by_the_steps_asked():
  ds = sequences()
  out = data.shift(ds, "shift", pixels=3).x_train
  np.testing.assert_array_equal(out[:, 3:], ds.x_train[:, :-3])
  np.testing.assert_array_equal(out[:, :3], 0)
  back = data.shift(ds, "shift", pixels=-2).x_train
  np.testing.assert_array_equal(back[:, :-2], ds.x_train[:, 2:])
  np.testing.assert_array_equal(back[:, -2:], 0)


def test_blur_keeps_the_mean_and_examples_apart():
  x = np.zeros((3, 12, 12, 2), np.float32)
  x[1, 5:7, 4:8, 0] = 1.0
  x[1, 6, 6, 0] = 5.0
  x[2] = np.random.default_rng(0).uniform(size=(12, 12, 2))
  ds = data.Dataset("img", x, np.zeros(3, int), x, np.zeros(3, int), 1)
  out = data.shift(ds, "blur", sigma=1.0).x_train
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[0], 0)  # Nothing leaks between examples...
  np.testing.assert_array_equal(out[1, ..., 1], 0)  # ... or between channels.
  np.testing.assert_allclose(out[1].mean(), x[1].mean(), rtol=1e-5)
  assert differs(out[1], x[1]) and out[1].max() < 5.0
  np.testing.assert_allclose(out[2].mean(), x[2].mean(), rtol=1e-5)
  np.testing.assert_array_equal(out, data.shift(ds, "blur", sigma=1.0).x_test)


def test_blur_acts_along_sequences():
  x = np.zeros((2, 20), np.float32)
  x[1, 10] = 1.0
  ds = data.Dataset("seq", x, np.zeros(2, int), x, np.zeros(2, int), 1)
  out = data.shift(ds, "blur", sigma=2.0).x_train
  np.testing.assert_array_equal(out[0], 0)
  np.testing.assert_allclose(out[1].sum(), 1.0, rtol=1e-6)
  assert out[1].argmax() == 10 and out[1, 10] < 0.25


def test_shift_keeps_a_task_a_task():
  task = data.split(small_mixture(), "disjoint_labels")[0]
  out = data.shift(task, "noise", std=0.1)
  assert isinstance(out, data.Task) and out.classes == task.classes
  assert out.name == "gaussian_mixture/disjoint_labels/0+noise"


@pytest.mark.parametrize(
    "transform, options, match",
    [
        ("sharpen", {}, "unknown transform 'sharpen'; valid: identity, noise, blur, shift"),
        ("noise", {"sigma": 1.0}, "no option.*sigma; valid: std"),
        ("noise", {"rng": None}, "no option.*rng"),
        ("identity", {"std": 1.0}, "valid: none"),
        ("noise", {"std": -0.1}, "std must be >= 0"),
        ("blur", {"sigma": 0.0}, "sigma must be > 0"),
        ("shift", {"pixels": (1, 2, 3)}, "pixels must be an int or 1 ints"),
        ("shift", {"pixels": 1.5}, "pixels must be"),
    ],
)
def test_shift_rejects_bad_transforms(transform, options, match):
  with pytest.raises(ValueError, match=match):
    data.shift(sequences(), transform, **options)


def test_spatial_transforms_need_images_or_sequences():
  x = np.zeros((2, 4, 4), np.float32)
  ds = data.Dataset("3d", x, np.zeros(2, int), x, np.zeros(2, int), 1)
  for transform in ("blur", "shift"):
    with pytest.raises(ValueError, match=r"images \[n, h, w, c\] or sequences"):
      data.shift(ds, transform)


# Batches.


def collect(stream):
  return [np.asarray(b) for b in stream]


def test_batches_cover_every_example_once_per_epoch():
  x, y = np.arange(10) * 10, np.arange(10)
  stream = list(data.batches(x, y, batch_size=3, seed=0, epochs=2))
  assert [len(yb) for _, yb in stream] == [3, 3, 3, 1] * 2
  for xb, yb in stream:
    np.testing.assert_array_equal(xb, yb * 10)
  epochs = [np.concatenate([yb for _, yb in stream[i:i + 4]]) for i in (0, 4)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(10))
  assert differs(epochs[0], epochs[1])


def test_batches_order_by_seed():
  x = np.arange(50)
  first = np.concatenate(collect(data.batches(x, batch_size=8, seed=7)))
  again = np.concatenate(collect(data.batches(x, batch_size=8, seed=7)))
  other = np.concatenate(collect(data.batches(x, batch_size=8, seed=8)))
  np.testing.assert_array_equal(first, again)
  assert differs(first, other) and differs(first, x)


def test_batches_without_shuffle_keep_order():
  x = np.arange(20.0).reshape(10, 2)
  out = collect(data.batches(x, batch_size=4, shuffle=False, epochs=2))
  assert [len(b) for b in out] == [4, 4, 2] * 2
  np.testing.assert_array_equal(np.concatenate(out[:3]), x)


def test_drop_remainder_drops_only_the_tail():
  x = np.arange(10)
  full = collect(data.batches(x, batch_size=3, seed=4, epochs=2))
  dropped = collect(data.batches(x, batch_size=3, seed=4, epochs=2, drop_remainder=True))
  assert [len(b) for b in dropped] == [3] * 6
  for got, want in zip(dropped, full[:3] + full[4:7], strict=True):
    np.testing.assert_array_equal(got, want)


def test_batches_repeat_and_restart():
  fresh = functools.partial(data.batches, np.arange(10), batch_size=3, seed=1)
  for a, b in zip(collect(fresh()), collect(fresh()), strict=True):
    np.testing.assert_array_equal(a, b)
  forever = collect(itertools.islice(data.batches(np.arange(10), batch_size=3, epochs=None), 9))
  assert [len(b) for b in forever] == [3, 3, 3, 1, 3, 3, 3, 1, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"y": np.arange(9)}, "same length"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"x": np.zeros((0, 3))}, "at least one example"),
        ({"batch_size": 11, "drop_remainder": True}, "leaves no batch"),
        ({"seed": -1}, "negative"),
    ],
)
def test_batches_reject_bad_arguments_at_the_call(kwargs, match):
  args = {"x": np.arange(10), "y": np.arange(10), "batch_size": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    data.batches(**args)  # No iteration: the call itself raises.


def test_replicas_are_the_whole_dataset():
  ds = data.load("gaussian_mixture")
  tasks = data.split(ds, "replicas", count=3)
  assert [t.name for t in tasks] == [f"{ds.name}/replicas/{i}" for i in range(3)]
  for t in tasks:
    np.testing.assert_array_equal(t.x_train, ds.x_train)
    np.testing.assert_array_equal(t.y_test, ds.y_test)
    assert t.classes == tuple(range(ds.num_classes))
  with pytest.raises(ValueError, match="count must be a positive int"):
    data.split(ds, "replicas", count=0)
