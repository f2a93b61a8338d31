r"""Layer least squares: mergejax's closed form against PLeaS's Adam fit.

    python -m experiments.benchmarks.least_squares
    python -m experiments.benchmarks.least_squares --train=1024 --resnet50

The regression problem of one merged layer (PLeaS, Nasery et al. 2024): two
independently initialised models A and B (random init, not trained, not
aligned), random normal images; the layer's inputs in either model, X_a and
X_b (its input rows: conv patches), give the merged layer's input
X = (X_a + X_b) / 2 and the target Y = (X_a W_a + X_b W_b) / 2, the average of
the originals' outputs; both fits start from (or pull towards)
W0 = (W_a + W_b) / 2.

Both methods get the same inputs: the layer's input activations of the
`--train` training images in A and in B, and the two kernels.

  Ours: accumulate G = X^T X (its upper blocks: G is symmetric) and C = X^T Y
    over the training rows (one jitted fori_loop over chunks of images,
    float32, Precision.HIGHEST; the rows from `least_squares.design_rows`), then
    `least_squares.ridge_solve(G, C, W0, --ridge)`.
  Adam (the PLeaS reference procedure, SewoongLab/PLeaS-Merging
    `pleas/methods/pleas_merging.py`): per-layer MSE of the layer's output
    against the target, optax.adam with optax.cosine_decay_schedule(5e-4, 400)
    (torch's Adam with CosineAnnealingLR there), 400 steps, minibatches of 16
    images (all their positions), starting from W0; the whole loop one jitted
    lax.scan. The merged inputs and targets of the training images are
    computed once before the loop (the reference recomputes them every step
    from both models' forward passes, which would only slow it down).

Each is compiled ahead of time, then timed once (statistics and solve, or
targets and loop) with block_until_ready. Held-out relative residuals
||XW - Y||^2 / ||Y||^2 are over `--heldout` other images, computed with the
convolution itself. "n*" is the smallest number of training images (a multiple of --chunk: 16,
32, 48, ... up to --train) with which the closed form's held-out residual is
at most Adam's; "ours@n*" is the closed form's time with n* images.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mergejax as mj
from mergejax import trace
from mergejax.merge import least_squares

HIGHEST = jax.lax.Precision.HIGHEST

_TRAIN = flags.DEFINE_integer("train", 512, "Training images (a multiple of --chunk).")
_HELDOUT = flags.DEFINE_integer("heldout", 512, "Held-out images.")
_RIDGE = flags.DEFINE_float("ridge", 1e-4, "Relative ridge of the closed form (lam = ridge * tr(G) / d).")
_STEPS = flags.DEFINE_integer("steps", 400, "Adam steps.")
_BATCH = flags.DEFINE_integer("batch", 16, "Adam minibatch (images).")
_LR = flags.DEFINE_float("lr", 5e-4, "Adam's peak learning rate (cosine decay to 0).")
_CHUNK = flags.DEFINE_integer("chunk", 16, "Images per step of the Gram accumulation.")
_WIDTH = flags.DEFINE_integer("width_multiplier", 4, "ResNet-20 width multiplier.")
_LAYERS = flags.DEFINE_list(
    "layers",
    ["stage0_block1/conv0", "stage1_block1/conv0", "stage2_block0/proj_conv", "stage2_block1/conv1"],
    "ResNet-20 kernels (module path, '/'-separated).")
_RESNET50 = flags.DEFINE_bool("resnet50", False, "Also fit ResNet-50 layers (--resnet50_layers).")
_RESNET50_LAYERS = flags.DEFINE_list(
    "resnet50_layers",
    ["stage1_block1/conv1", "stage3_block1/conv0", "stage3_block1/conv1", "stage3_block1/conv2"],
    "ResNet-50 kernels.")
_RESNET50_INPUT = flags.DEFINE_integer("resnet50_input", 128, "ResNet-50 input side.")


def _conv(x: jax.Array, w: jax.Array, params) -> jax.Array:
  """The layer's own convolution (the traced use's parameters)."""
  return jax.lax.conv_general_dilated(
      x, w, params["window_strides"], params["padding"], params["lhs_dilation"],
      params["rhs_dilation"], params["dimension_numbers"], precision=HIGHEST)


def _output_rows(y: jax.Array, params) -> jax.Array:
  """f32[batch, ..., k] conv output -> f32[rows, k], rows as `design_rows` orders them."""
  out = params["dimension_numbers"].out_spec
  y = jnp.moveaxis(y, (out[0], out[1]), (0, -1))
  return y.reshape(-1, y.shape[-1])


class Layer:
  """One kernel's regression problem.

  Attributes:
    name: the kernel's module path.
    use: its traced use (`trace.KernelUse`, from a small batch).
    w_a, w_b, w0: the kernels of A and B and their average (kernel shape).
    plan: the kernel's matrix view (`least_squares.kernel_plan`).
    d, k: rows and columns of that matrix.
  """

  def __init__(self, name, use, w_a, w_b):
    self.name, self.use = name, use
    self.w_a, self.w_b = jnp.asarray(w_a, jnp.float32), jnp.asarray(w_b, jnp.float32)
    self.w0 = (self.w_a + self.w_b) / 2
    self.shape = tuple(self.w_a.shape)
    self.plan = least_squares.kernel_plan(use, self.shape, name)
    self.order = list(self.plan.in_axes) + list(self.plan.out_axes)
    self.d = int(np.prod([self.shape[a] for a in self.plan.in_axes]))
    self.k = int(np.prod([self.shape[a] for a in self.plan.out_axes]))
    x = jnp.asarray(use.input, jnp.float32)
    ours = least_squares.design_rows(use, self.shape).reshape(-1, self.d)
    np.testing.assert_allclose(patch_rows(x, self), ours, rtol=0, atol=1e-6)

  def to_matrix(self, w: jax.Array) -> jax.Array:
    """Kernel -> f32[d, k] (an HWIO conv kernel: (I, H, W, O) reshaped)."""
    return jnp.transpose(w, self.order).reshape(self.d, self.k)

  def from_matrix(self, m: jax.Array) -> jax.Array:
    m = m.reshape([self.shape[a] for a in self.order])
    return jnp.transpose(m, np.argsort(self.order))

  def targets(self, in_a: jax.Array, in_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The merged layer's input (x_a + x_b) / 2 and the target outputs (y_a + y_b) / 2."""
    p = self.use.params
    return (in_a + in_b) / 2, (_conv(in_a, self.w_a, p) + _conv(in_b, self.w_b, p)) / 2


def closed_form_stats(layer: Layer, chunk: int, parts: int = 3):
  """jit (in_a, in_b) -> (G f32[d, d], C f32[d, k]) over all images, `chunk` at a time.

  G is symmetric: its features are cut into `parts` ranges and only the blocks on and above the diagonal
  are accumulated (6 of 9 products for 3 parts), the rest filled in by transposes after the loop.
  """
  cuts = np.linspace(0, layer.d, parts + 1).astype(int)
  upper = [(i, j) for i in range(parts) for j in range(i, parts)]

  def stats(in_a, in_b):
    steps = in_a.shape[0] // chunk

    def body(i, gc):
      g, c = gc
      xa = jax.lax.dynamic_slice_in_dim(in_a, i * chunk, chunk)
      xb = jax.lax.dynamic_slice_in_dim(in_b, i * chunk, chunk)
      xm, y = layer.targets(xa, xb)
      rows = least_squares.design_rows(layer.use._replace(input=xm), layer.shape).reshape(-1, layer.d)
      y = _output_rows(y, layer.use.params)
      cols = [rows[:, cuts[k]:cuts[k + 1]] for k in range(parts)]
      g = {(a, b): g[a, b] + jnp.matmul(cols[a].T, cols[b], precision=HIGHEST) for a, b in upper}
      c = c + jnp.matmul(rows.T, y, precision=HIGHEST)
      return g, c

    zeros = ({(a, b): jnp.zeros((cuts[a + 1] - cuts[a], cuts[b + 1] - cuts[b]), jnp.float32) for a, b in upper},
             jnp.zeros((layer.d, layer.k), jnp.float32))
    g, c = jax.lax.fori_loop(0, steps, body, zeros)
    g = jnp.block([[g[a, b] if a <= b else g[b, a].T for b in range(parts)] for a in range(parts)])
    return g, c

  return jax.jit(stats)


def patch_rows(x: jax.Array, layer: "Layer") -> jax.Array:
  """f32[batch, h, w, c] -> f32[rows, d]: the conv's input rows by strided slices.

  The same rows as `least_squares.design_rows` (features in (C, kh, kw) order),
  for NHWC inputs and HWIO kernels without dilation; slicing is cheaper on CPU
  than `conv_general_dilated_patches`, so the baseline gets it.
  """
  p = layer.use.params
  dn = p["dimension_numbers"]
  if tuple(dn.lhs_spec) != (0, 3, 1, 2) or tuple(dn.rhs_spec) != (3, 2, 0, 1) or any(
      d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"])):
    raise ValueError(f"{layer.name}: patch_rows handles NHWC/HWIO convolutions without dilation")
  kh, kw, c, _ = layer.shape
  (sh, sw), (ph, pw) = p["window_strides"], p["padding"]
  x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
  return jnp.stack(cols, -1).reshape(-1, c * kh * kw)


def adam_fit(layer: Layer, steps: int, lr: float):
  """jit (in_a, in_b, order i32[steps, batch]) -> kernel: PLeaS's per-layer Adam fit.

  Each step's loss is the mean squared error of the minibatch's outputs,
  computed as patch rows @ kernel matrix (the same function as the
  convolution; XLA:CPU runs a convolution's kernel gradient inside a loop
  about 60x slower than this matrix product, which would flatter us).
  """
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def fit(in_a, in_b, order):
    xm, y = layer.targets(in_a, in_b)

    def loss(w, idx):
      rows = patch_rows(xm[idx], layer)
      return jnp.mean((jnp.matmul(rows, w, precision=HIGHEST) - _output_rows(y[idx], layer.use.params)) ** 2)

    def step(carry, idx):
      w, state = carry
      grad = jax.grad(loss)(w, idx)
      updates, state = opt.update(grad, state, w)
      return (optax.apply_updates(w, updates), state), None

    w0 = layer.to_matrix(layer.w0)
    (w, _), _ = jax.lax.scan(step, (w0, opt.init(w0)), order)
    return layer.from_matrix(w)

  return jax.jit(fit)


def residual_fn(layer: Layer):
  """jit (w, in_a, in_b) -> ||X W - Y||^2 / ||Y||^2 on those images."""

  def residual(w, in_a, in_b):
    xm, y = layer.targets(in_a, in_b)
    err = _conv(xm, w, layer.use.params) - y
    return jnp.sum(err**2) / jnp.sum(y**2)

  return jax.jit(residual)


def epoch_order(n: int, steps: int, batch: int, seed: int) -> np.ndarray:
  """i32[steps, batch]: minibatches of a reshuffled pass over n images, epoch after epoch."""
  rng = np.random.default_rng(seed)
  need = steps * batch
  idx = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
  return idx[:need].reshape(steps, batch).astype(np.int32)


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def bench_layer(layer: Layer, train_a, train_b, held_a, held_b) -> dict:
  """Fits one layer both ways; times, held-out residuals and n*."""
  n = train_a.shape[0]
  chunk, ridge = _CHUNK.value, _RIDGE.value
  stats = closed_form_stats(layer, chunk)
  w0_mat = layer.to_matrix(layer.w0)

  def ours(in_a, in_b, compiled):
    g, c = compiled(in_a, in_b)
    return layer.from_matrix(least_squares.ridge_solve(g, c, w0_mat, ridge, layer.name))

  compiled = stats.lower(train_a, train_b).compile()
  jax.block_until_ready(least_squares.ridge_solve(
      jnp.eye(layer.d), jnp.zeros((layer.d, layer.k)), w0_mat, ridge))  # warm up the solve's ops
  w_ours, t_ours = _timed(ours, train_a, train_b, compiled)

  order = epoch_order(n, _STEPS.value, _BATCH.value, seed=0)
  fit = adam_fit(layer, _STEPS.value, _LR.value).lower(train_a, train_b, order).compile()
  w_adam, t_adam = _timed(fit, train_a, train_b, order)

  residual = residual_fn(layer)
  res = {name: float(residual(w, held_a, held_b))
         for name, w in (("w0", layer.w0), ("ours", w_ours), ("adam", w_adam))}

  # n*: the Gram grows chunk by chunk (untimed); solve at every multiple of the chunk (16, 32, 48, ... images).
  acc = jax.jit(lambda gc, a, b: jax.tree.map(jnp.add, gc, stats(a, b)))
  gc = (jnp.zeros((layer.d, layer.d)), jnp.zeros((layer.d, layer.k)))
  sizes = list(range(chunk, n + 1, chunk))
  n_star, res_star, done = None, None, 0
  by_size = {}
  for size in sizes:
    for lo in range(done, size, chunk):
      gc = acc(gc, train_a[lo:lo + chunk], train_b[lo:lo + chunk])
    done = size
    w = layer.from_matrix(least_squares.ridge_solve(*gc, w0_mat, ridge, layer.name))
    by_size[size] = float(residual(w, held_a, held_b))
    if by_size[size] <= res["adam"]:
      n_star, res_star = size, by_size[size]
      break
  t_star = None
  if n_star is not None:
    compiled_star = stats.lower(train_a[:n_star], train_b[:n_star]).compile()
    _, t_star = _timed(ours, train_a[:n_star], train_b[:n_star], compiled_star)
  return dict(d=layer.d, k=layer.k, rows=int(np.prod(layer.use.output.shape[1:-1])), t_ours=t_ours,
              t_adam=t_adam, res=res, n_star=n_star, res_star=res_star, t_star=t_star, by_size=by_size)


def gather(model, variables, images, paths, batch: int = 128) -> list[np.ndarray]:
  """The inputs of kernels `paths` for all images (one model), batch by batch."""

  @jax.jit
  def inputs(v, x):
    _, uses = trace.kernel_uses(lambda v, x: model.apply(v, x, train=False))(v, x)
    return [uses[p][0].input for p in paths]

  parts = [inputs(variables, images[i:i + batch]) for i in range(0, len(images), batch)]
  return [np.concatenate([p[j] for p in parts]) for j in range(len(paths))]


def run_model(name: str, layer_names, side: int, **kwargs) -> list[tuple[str, dict]]:
  """Builds A and B, gathers the layers' inputs and fits each layer."""
  model = mj.models.build(name, **kwargs)
  n_train, n_held = _TRAIN.value, _HELDOUT.value
  if n_train % _CHUNK.value or n_train % _BATCH.value:
    raise ValueError(f"--train={n_train} must be a multiple of --chunk and --batch")
  x = jax.random.normal(jax.random.key(2), (n_train + n_held, side, side, 3))
  init = jax.jit(lambda key: model.init(key, x[:2], train=False))
  va, vb = init(jax.random.key(0)), init(jax.random.key(1))
  paths = [("params", *n.split("/"), "kernel") for n in layer_names]
  _, uses = trace.kernel_uses(lambda v, x: model.apply(v, x, train=False))(va, x[:2])
  start = time.perf_counter()
  acts_a = gather(model, va, x, paths)
  acts_b = gather(model, vb, x, paths)
  print(f"{name}: {mj.tree.num_params(va['params']):,} parameters; {n_train} train + {n_held} held-out"
        f" {side}x{side} images; layer inputs gathered in {time.perf_counter() - start:.1f} s")
  _print_header()
  leaves_a, leaves_b = mj.tree.leaves_by_path(va), mj.tree.leaves_by_path(vb)
  results = []
  for lname, path, in_a, in_b in zip(layer_names, paths, acts_a, acts_b):
    layer = Layer(lname, uses[path][0], leaves_a[path], leaves_b[path])
    a, b = jnp.asarray(in_a), jnp.asarray(in_b)
    r = bench_layer(layer, a[:n_train], b[:n_train], a[n_train:], b[n_train:])
    results.append((f"{name} {lname}", r))
    _print_row(results[-1])
  return results


def _print_header():
  print(f"{'layer':34s} {'d_in':>5s} {'d_out':>5s} {'rows/img':>8s} {'ours (s)':>9s} {'adam (s)':>9s}"
        f" {'speed-up':>8s} {'res W0':>8s} {'res ours':>8s} {'res adam':>8s} {'n*':>5s}"
        f" {'res@n*':>8s} {'ours@n* (s)':>11s} {'speed-up@n*':>11s}")


def _print_row(item):
  name, r = item
  star = (f"{r['n_star']:5d} {r['res_star']:8.4f} {r['t_star']:11.3f} {r['t_adam'] / r['t_star']:11.1f}"
          if r["n_star"] is not None else f"{'>' + str(_TRAIN.value):>5s} {'':8s} {'':11s} {'':11s}")
  print(f"{name:34s} {r['d']:5d} {r['k']:5d} {r['rows']:8d} {r['t_ours']:9.3f} {r['t_adam']:9.3f}"
        f" {r['t_adam'] / r['t_ours']:8.1f} {r['res']['w0']:8.4f} {r['res']['ours']:8.4f}"
        f" {r['res']['adam']:8.4f} {star}", flush=True)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}); ridge {_RIDGE.value:g}; Adam: {_STEPS.value}"
        f" steps, batch {_BATCH.value} images, lr {_LR.value:g} cosine; random init A, B (untrained)")
  results = run_model("resnet20", _LAYERS.value, 32, width_multiplier=_WIDTH.value, num_classes=10)
  if _RESNET50.value:
    results += run_model("resnet50", _RESNET50_LAYERS.value, _RESNET50_INPUT.value, num_classes=1000)
  met = [r["t_adam"] >= 10 * r["t_ours"] and r["res"]["ours"] <= r["res"]["adam"] for _, r in results]
  met_star = [r["n_star"] is not None and r["t_adam"] >= 10 * r["t_star"] for _, r in results]
  print(f"target (closed form >= 10x faster than Adam at <= its held-out residual):"
        f" with all {_TRAIN.value} train images met on {sum(met)} of {len(met)} layers;"
        f" with n* images met on {sum(met_star)} of {len(met_star)}")


if __name__ == "__main__":
  app.run(main)
