"""ONNX from a JAX function: its jaxpr, op by op, as an ONNX graph (opset `OPSET`).

The function is traced once with a symbolic batch dimension; every equation
whose inputs are all known (weights, iotas, resize matrices) is evaluated
here and stored as a constant, and the rest becomes ONNX nodes. Values keep a
lazy layout: a tensor may be stored transposed (a convolution's output stays
NCHW, ONNX's layout) and elementwise ops, reductions, pads and slices follow
that layout, so the graph transposes only where an op needs another one.

Covers the primitives of the folded networks and the serving preprocessing
(`nfnets_jax.export.serving`); anything else raises `UnsupportedPrimitiveError`
naming it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import string
from typing import Any, Callable, Optional, Sequence

import jax
from jax.extend import core as jax_core
import numpy as np

OPSET = 18
#: Above this many bytes of weights, `save` keeps them in a side file (protobuf's 2 GiB cap).
EXTERNAL_DATA_BYTES = 1 << 30
INPUT_NAME = "images"
OUTPUT_NAME = "output"


class UnsupportedPrimitiveError(NotImplementedError):
  """A jaxpr equation this translator has no ONNX form for."""


@dataclasses.dataclass(frozen=True)
class _Node:
  """A value computed by the graph: ONNX tensor `name` = transpose(JAX value, `perm`)."""
  name: str
  perm: tuple[int, ...]


def _identity(rank: int) -> tuple[int, ...]:
  return tuple(range(rank))


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argsort(perm))


class _Builder:
  """Collects nodes and initializers; names every tensor once."""

  def __init__(self):
    import onnx

    self.onnx = onnx
    self.nodes: list[Any] = []
    self.initializers: list[Any] = []
    self._count = 0

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def op(self, op_type: str, inputs: Sequence[str], **attrs) -> str:
    out = self.fresh(op_type.lower())
    self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
    return out

  def constant(self, value: Any) -> str:
    name = self.fresh("const")
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def ints(self, values: Sequence[int]) -> str:
    return self.constant(np.asarray(values, np.int64))


class _Translator:
  """Walks a jaxpr, keeping known values as numpy arrays and the rest as `_Node`s."""

  def __init__(self, builder: _Builder):
    self.b = builder
    self.env: dict[Any, Any] = {}

  # -- values -------------------------------------------------------------------------

  def read(self, var):
    if isinstance(var, jax_core.Literal):
      return np.asarray(var.val)
    return self.env[var]

  def in_layout(self, value, perm: tuple[int, ...]) -> str:
    """The ONNX tensor name of `value` stored as transpose(value, perm)."""
    if isinstance(value, _Node):
      if value.perm == perm:
        return value.name
      # onnx tensor = transpose(x, value.perm); wanted transpose(x, perm).
      inv = _inverse(value.perm)
      return self.b.op("Transpose", [value.name], perm=[inv[p] for p in perm])
    array = np.asarray(value)
    return self.b.constant(np.transpose(array, perm) if array.ndim else array)

  def plain(self, value) -> str:
    return self.in_layout(value, _identity(np.ndim(value) if not isinstance(value, _Node)
                                           else len(value.perm)))

  # -- the walk -----------------------------------------------------------------------

  def run(self, jaxpr, consts, args):
    for var, value in zip(jaxpr.constvars, consts):
      self.env[var] = np.asarray(value)
    for var, value in zip(jaxpr.invars, args):
      self.env[var] = value
    for eqn in jaxpr.eqns:
      inputs = [self.read(v) for v in eqn.invars]
      outputs = self.equation(eqn, inputs)
      for var, value in zip(eqn.outvars, outputs):
        self.env[var] = value
    return [self.read(v) for v in jaxpr.outvars]

  def equation(self, eqn, inputs) -> list[Any]:
    name = eqn.primitive.name
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if inner is not None and name in ("jit", "pjit", "custom_jvp_call", "custom_vjp_call",
                                      "closed_call", "core_call", "remat"):
      closed = inner if hasattr(inner, "jaxpr") else jax_core.ClosedJaxpr(inner, ())
      return self.run(closed.jaxpr, closed.consts, inputs)
    if not any(isinstance(x, _Node) for x in inputs) and _static_shapes(eqn.outvars):
      out = eqn.primitive.bind(*inputs, **eqn.params)
      return [np.asarray(o) for o in (out if eqn.primitive.multiple_results else [out])]
    rule = _RULES.get(name)
    if rule is None:
      raise UnsupportedPrimitiveError(
          f"No ONNX translation for the JAX primitive {name!r} (giving "
          f"{', '.join(str(v.aval) for v in eqn.outvars)}); "
          f"the ONNX export covers {', '.join(sorted(_RULES))}.")
    return [rule(self, eqn, *inputs)]


def _static_shapes(outvars) -> bool:
  return all(all(_is_static(d) for d in v.aval.shape) for v in outvars)


def _rank(value) -> int:
  return len(value.perm) if isinstance(value, _Node) else np.ndim(value)


def _layout_of(inputs) -> tuple[int, ...]:
  """The layout an elementwise op runs in: a full-rank computed input's, preferring one an
  op such as a convolution chose (not the identity), so the big tensors stay as they are."""
  rank = max(_rank(x) for x in inputs)
  perms = [x.perm for x in inputs if isinstance(x, _Node) and len(x.perm) == rank]
  return next((p for p in perms if p != _identity(rank)), _identity(rank))


def _elementwise(op_type: str, **attrs) -> Callable:
  def rule(t: _Translator, eqn, *inputs):
    perm = _layout_of(inputs)
    names = [t.in_layout(x, perm) if _rank(x) == len(perm) else t.plain(x) for x in inputs]
    return _Node(t.b.op(op_type, names, **attrs), perm)
  return rule


def _not_equal(t, eqn, x, y):
  equal = _elementwise("Equal")(t, eqn, x, y)
  return _Node(t.b.op("Not", [equal.name]), equal.perm)


def _integer_pow(t, eqn, x):
  y = eqn.params["y"]
  if y == 2:
    return _Node(t.b.op("Mul", [x.name, x.name]), x.perm)
  if y == 3:
    square = t.b.op("Mul", [x.name, x.name])
    return _Node(t.b.op("Mul", [square, x.name]), x.perm)
  exponent = t.b.constant(np.asarray(y, np.dtype(eqn.outvars[0].aval.dtype)))
  return _Node(t.b.op("Pow", [x.name, exponent]), x.perm)


def _convert(t, eqn, x):
  dtype = t.b.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params["new_dtype"]))
  return _Node(t.b.op("Cast", [x.name], to=dtype), x.perm)


def _same(t, eqn, x):
  return x


def _select_n(t, eqn, predicate, *cases):
  if len(cases) != 2:
    raise UnsupportedPrimitiveError(f"select_n with {len(cases)} cases (ONNX Where takes 2).")
  perm = _layout_of([predicate, *cases])
  names = [t.in_layout(x, perm) if _rank(x) == len(perm) else t.plain(x)
           for x in (predicate, cases[1], cases[0])]
  return _Node(t.b.op("Where", names), perm)


def _reduce(op_type: str) -> Callable:
  def rule(t: _Translator, eqn, x):
    axes = [x.perm.index(a) for a in eqn.params["axes"]]
    out = t.b.op(op_type, [x.name, t.b.ints(axes)], keepdims=0)
    kept = [a for a in x.perm if a not in eqn.params["axes"]]
    return _Node(out, tuple(int(i) for i in np.argsort(np.argsort(kept))))
  return rule


def _broadcast_in_dim(t, eqn, x):
  """Size-1 axes inserted, then expanded where a static size grows (a symbolic one cannot)."""
  shape, dims = eqn.params["shape"], tuple(eqn.params["broadcast_dimensions"])
  if list(dims) != sorted(dims):
    raise UnsupportedPrimitiveError(f"broadcast_in_dim reordering axes ({dims}).")
  operand = eqn.invars[0].aval.shape
  name = t.plain(x)
  new_axes = [a for a in range(len(shape)) if a not in dims]
  if new_axes:
    name = t.b.op("Unsqueeze", [name, t.b.ints(new_axes)])
  expand = []
  for a, size in enumerate(shape):
    own = operand[dims.index(a)] if a in dims else 1
    if _is_static(own) and own == 1 and not (_is_static(size) and size == 1):
      if not _is_static(size):
        raise UnsupportedPrimitiveError(
            f"broadcast_in_dim to the symbolic dimension {size}: only a value that already "
            "has the batch dimension can carry it.")
      expand.append(int(size))
    else:
      expand.append(1)
  if any(e != 1 for e in expand):
    name = t.b.op("Expand", [name, t.b.ints(expand)])
  return _Node(name, _identity(len(shape)))


def _is_static(size) -> bool:
  return isinstance(size, (int, np.integer))


def _same_size(a, b) -> bool:
  """Whether two sizes, static or symbolic, are the same (never asks a symbolic one for an int)."""
  return a == b if _is_static(a) == _is_static(b) else False


def _reshape(t, eqn, x):
  """A reshape that only splits axes keeps the input's layout; any other runs in JAX's."""
  old, new = eqn.invars[0].aval.shape, tuple(eqn.params["new_sizes"])
  groups = _split_groups(old, new)
  if groups is None:  # Merges axes: needs JAX's (row-major) layout.
    name, perm = t.plain(x), _identity(len(new))
  else:  # Each stored axis becomes the axes it splits into, in place.
    name, perm = x.name, tuple(a for k in x.perm for a in groups[k])
  sizes = [int(new[a]) if _is_static(new[a]) else -1 for a in perm]
  if sizes.count(-1) > 1:
    raise UnsupportedPrimitiveError(f"reshape of {old} to {new}: more than one size to infer.")
  return _Node(t.b.op("Reshape", [name, t.b.ints(sizes)]), perm)


def _split_groups(old, new) -> Optional[list[list[int]]]:
  """For each axis of `old`, the axes of `new` it splits into, when `new` only splits."""
  groups, j = [], 0
  for size in old:
    group = []
    if not _is_static(size):
      if j < len(new) and _same_size(new[j], size):
        group, j = [j], j + 1
      else:
        return None
    else:
      product = 1
      while j < len(new) and _is_static(new[j]) and product < size:
        product *= int(new[j])
        group.append(j)
        j += 1
      if product != size or not group:
        return None
    groups.append(group)
  return groups if j == len(new) else None


def _squeeze(t, eqn, x):
  dims = eqn.params["dimensions"]
  out = t.b.op("Squeeze", [x.name, t.b.ints([x.perm.index(d) for d in dims])])
  kept = [a for a in x.perm if a not in dims]
  return _Node(out, tuple(int(i) for i in np.argsort(np.argsort(kept))))


def _transpose(t, eqn, x):
  inv = _inverse(eqn.params["permutation"])
  return _Node(x.name, tuple(inv[p] for p in x.perm))


def _pad(t, eqn, x, value):
  config = eqn.params["padding_config"]
  if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0 for lo, hi, _ in config):
    raise UnsupportedPrimitiveError(f"pad with interior or negative padding ({config}).")
  begins = [config[a][0] for a in x.perm]
  ends = [config[a][1] for a in x.perm]
  out = t.b.op("Pad", [x.name, t.b.ints(begins + ends), t.plain(value)], mode="constant")
  return _Node(out, x.perm)


def _slice(t, eqn, x):
  """Only the axes cut are named, so the (symbolic) batch axis is never one of them."""
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(starts)
  full = eqn.invars[0].aval.shape
  cut = [a for a in range(len(starts))
         if starts[a] != 0 or strides[a] != 1 or not _same_size(limits[a], full[a])]
  if not all(_is_static(limits[a]) and _is_static(full[a]) for a in cut):
    raise UnsupportedPrimitiveError(f"slice of the symbolic batch dimension ({eqn.params}).")
  inputs = [x.name, t.b.ints([starts[a] for a in cut]), t.b.ints([limits[a] for a in cut]),
            t.b.ints([x.perm.index(a) for a in cut]), t.b.ints([strides[a] for a in cut])]
  return _Node(t.b.op("Slice", inputs), x.perm)


def _concatenate(t, eqn, *inputs):
  perm = _layout_of(inputs)
  names = [t.in_layout(x, perm) for x in inputs]
  return _Node(t.b.op("Concat", names, axis=perm.index(eqn.params["dimension"])), perm)


def _conv(t, eqn, x, kernel):
  p = eqn.params
  dn = p["dimension_numbers"]
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise UnsupportedPrimitiveError("conv_general_dilated with lhs dilation or batch groups.")
  if isinstance(kernel, _Node):
    raise UnsupportedPrimitiveError("a convolution whose kernel is computed from the input.")
  lhs, rhs, out = (tuple(s) for s in (dn.lhs_spec, dn.rhs_spec, dn.out_spec))
  weight = t.b.constant(np.transpose(np.asarray(kernel), rhs))
  pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
  conv = t.b.op("Conv", [t.in_layout(x, lhs), weight], strides=list(p["window_strides"]),
                pads=pads, dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])
  return _Node(conv, out)


def _dot_general(t, eqn, lhs, rhs):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lrank, rrank = _rank(lhs), _rank(rhs)
  if not lb and tuple(lc) == (lrank - 1,) and tuple(rc) == (0,) and rrank == 2:
    return _Node(t.b.op("MatMul", [t.plain(lhs), t.plain(rhs)]), _identity(lrank))
  letters = iter(string.ascii_lowercase)
  lhs_axes = [next(letters) for _ in range(lrank)]
  rhs_axes = [next(letters) for _ in range(rrank)]
  for a, b in zip(list(lc) + list(lb), list(rc) + list(rb)):
    rhs_axes[b] = lhs_axes[a]
  out = ([lhs_axes[a] for a in lb] + [c for i, c in enumerate(lhs_axes) if i not in (*lc, *lb)] +
         [c for i, c in enumerate(rhs_axes) if i not in (*rc, *rb)])
  equation = f"{''.join(lhs_axes)},{''.join(rhs_axes)}->{''.join(out)}"
  return _Node(t.b.op("Einsum", [t.plain(lhs), t.plain(rhs)], equation=equation),
               _identity(len(out)))


def _max_pool(t, eqn, x):
  p = eqn.params
  lhs = (0, 3, 1, 2)
  if _rank(x) != 4 or p["window_dimensions"][0] != 1 or p["window_dimensions"][3] != 1:
    raise UnsupportedPrimitiveError(f"reduce_window_max over {p['window_dimensions']} (ONNX "
                                    "MaxPool covers NHWC spatial windows).")
  pads = [p["padding"][1][0], p["padding"][2][0], p["padding"][1][1], p["padding"][2][1]]
  out = t.b.op("MaxPool", [t.in_layout(x, lhs)], kernel_shape=list(p["window_dimensions"][1:3]),
               strides=list(p["window_strides"][1:3]), pads=pads)
  return _Node(out, lhs)


_RULES: dict[str, Callable] = {
    "add": _elementwise("Add"), "sub": _elementwise("Sub"), "mul": _elementwise("Mul"),
    "div": _elementwise("Div"), "max": _elementwise("Max"), "min": _elementwise("Min"),
    "pow": _elementwise("Pow"), "exp": _elementwise("Exp"), "log": _elementwise("Log"),
    "tanh": _elementwise("Tanh"), "logistic": _elementwise("Sigmoid"), "erf": _elementwise("Erf"),
    "abs": _elementwise("Abs"), "neg": _elementwise("Neg"), "sqrt": _elementwise("Sqrt"),
    "floor": _elementwise("Floor"), "ceil": _elementwise("Ceil"), "sign": _elementwise("Sign"),
    "gt": _elementwise("Greater"), "ge": _elementwise("GreaterOrEqual"),
    "lt": _elementwise("Less"), "le": _elementwise("LessOrEqual"), "eq": _elementwise("Equal"),
    "ne": _not_equal, "and": _elementwise("And"), "or": _elementwise("Or"),
    "integer_pow": _integer_pow, "convert_element_type": _convert, "select_n": _select_n,
    "stop_gradient": _same, "copy": _same, "copy_p": _same,
    "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"), "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape, "squeeze": _squeeze, "transpose": _transpose, "pad": _pad,
    "slice": _slice, "concatenate": _concatenate, "conv_general_dilated": _conv,
    "dot_general": _dot_general, "reduce_window_max": _max_pool,
}


def to_onnx(fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[Optional[int]],
            input_dtype: Any, *, doc: str = "") -> Any:
  """The `onnx.ModelProto` of `fn` (one NHWC batch in, one array out).

  `input_shape[0]` is the batch size, or None to leave it free in the model (its
  input `INPUT_NAME` and output `OUTPUT_NAME` name it 'batch').
  """
  import onnx

  spec = jax.ShapeDtypeStruct((_batch_dim(input_shape[0]), *input_shape[1:]), input_dtype)
  closed = jax.make_jaxpr(fn)(spec)
  builder = _Builder()
  translator = _Translator(builder)
  image = _Node(INPUT_NAME, _identity(len(input_shape)))
  result, = translator.run(closed.jaxpr, closed.consts, [image])
  if not isinstance(result, _Node):
    raise ValueError("The exported function's output does not depend on its input.")
  builder.nodes.append(onnx.helper.make_node("Identity", [translator.plain(result)],
                                             [OUTPUT_NAME]))
  out_aval = closed.out_avals[0]

  def value_info(name, dtype, shape):
    dims = [int(d) if _is_static(d) else "batch" for d in shape]
    return onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims)

  graph = onnx.helper.make_graph(
      builder.nodes, "nfnets_jax", [value_info(INPUT_NAME, input_dtype, spec.shape)],
      [value_info(OUTPUT_NAME, out_aval.dtype, out_aval.shape)], builder.initializers)
  model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                 producer_name="nfnets_jax", doc_string=doc)
  # IR version 10 (ONNX 1.16) at most: not the newest this onnx writes, so older runtimes load it.
  model.ir_version = min(model.ir_version, 10)
  return model


def _batch_dim(batch_size: Optional[int]):
  """`batch_size`, or a symbolic dimension called 'batch' for None."""
  return jax.export.symbolic_shape("batch")[0] if batch_size is None else batch_size


def save(model: Any, path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
  """Writes `model` to `path`; weights over `external_data_bytes` in all go to
  `<path>.data` beside it (protobuf cannot hold a file over 2 GiB)."""
  import onnx

  path = pathlib.Path(path)
  if sum(t.ByteSize() for t in model.graph.initializer) <= external_data_bytes:
    onnx.save_model(model, str(path))
  else:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")
