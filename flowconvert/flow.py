r"""The converted model: :class:`FlowModel`, a chain of flow layers with generated fx graphs.

With a base density per output, the log-density of an input is

.. math:: \log p(x) = \sum_{\text{outputs } z} \log p_{\text{base}}(z) + \sum_{\text{layers}} L_{\text{layer}},

where every layer reports its contribution through ``layer.call_and_ll(x, noise)``
(:mod:`flowconvert.core`). The model keeps three generated :class:`torch.fx.GraphModule`
programs over the same layers, readable with ``print(...)``:

* :attr:`FlowModel.function_graph`: the original function, ``layer(x)`` node by node;
* :attr:`FlowModel.likelihood_graph` (also :attr:`FlowModel.code`): threads
  ``call_and_ll`` through the graph and sums the contributions with the base densities;
* :attr:`FlowModel.inverse_graph`: the layers in reverse order, ``layer.inverse(y, sample, noise)``.

Noise is explicit. :meth:`FlowModel.noise_shapes` names every layer whose stochastic forward
consumes standard-normal noise (augmenting layers) with its per-sample shape, and
:meth:`FlowModel.inverse_noise_shapes` every layer whose sampled inverse does (funnels).
``noise=None`` draws fresh noise (stochastic mode) or uses none (deterministic mode);
a dict ``{name: tensor of shape (batch, *shape)}`` is used verbatim.

For a model with *bound* layers (``flow.exact is False``), the deterministic log-density is
a point evaluation of the bound at zero noise, not a bound on ``log p(x)``; the stochastic one
is an unbiased one-sample lower bound, tightened by ``num_samples=K``
(:math:`\log \frac1K\sum_k e^{L_k}`).

>>> import torch, flowconvert as fc
>>> torch.manual_seed(0) and None
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LeakyReLU(0.1), torch.nn.Linear(4, 2))
>>> flow = fc.convert(net, torch.randn(1, 4))
>>> x = torch.randn(5, 4)
>>> torch.equal(flow(x), net(x)), flow.log_prob(x).shape, flow.exact
(True, torch.Size([5]), True)
>>> flow.inverse_noise_shapes()
{'_2': (2,)}
>>> flow.inverse(flow(x), sample=True).shape, flow.sample(3).shape
(torch.Size([5, 4]), torch.Size([3, 4]))
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, fx, nn

from .config import Configurable
from .core import FlowLayer
from .validation import check_batch, check_count, check_noise, flow_dtype

__all__ = ["FlowModel", "FlowPlan", "Step"]


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """One layer application: ``layer`` (key in ``flow.layers``) maps value ``source`` to value ``name``.

    Layers with several inputs or outputs (:mod:`flowconvert.merging`) also list them:
    ``sources`` (all input values, in argument order; ``source`` is the first) and ``names``
    (all output values, in output order; then ``name`` names the tuple itself).
    """

    name: str
    layer: str
    source: str
    in_shape: Shape
    out_shape: Shape
    root: int = 0  # index of the model input this value descends from
    sources: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The input values, in argument order."""
        return self.sources or (self.source,)


@dataclass
class FlowPlan:
    """Plain-data description of a flow: inputs, steps in graph order, the output structure.

    ``outputs`` is the model's return structure with value names where tensors were;
    ``output_names`` lists them in flattening order, ``output_shapes`` their per-sample shapes,
    ``base_keys`` the key of each one's base density in ``flow.bases``.
    """

    inputs: list[tuple[str, Shape]]
    steps: list[Step]
    outputs: Any
    output_names: list[str]
    output_shapes: list[Shape]
    base_keys: list[str] = field(default_factory=list)  # key in ``flow.bases`` per output


def _get_attr(g: fx.Graph, target: str, name: str) -> fx.Node:
    return g.create_node("get_attr", target, name=name)


def _unpack_outputs(g: fx.Graph, step: Step, env: dict[str, fx.Node]) -> None:
    """Name each output of a multi-output step (``env[step.name]`` holds the tuple)."""
    for i, v in enumerate(step.names):
        env[v] = g.create_node("call_function", operator.getitem, (env[step.name], i), name=v)


class FlowModel(Configurable, nn.Module):
    """A normalizing flow built from a traced network (see :func:`flowconvert.convert`).

    ``flow(*inputs)`` is the original network's output; ``layers`` (a ModuleDict of flow
    layers, keyed by graph-node name) and ``bases`` (one base density per output) hold all
    parameters and buffers. Follows the :class:`flowconvert.core.Flow` protocol and its
    defaults: ``log_prob`` and ``forward_with_log_prob`` are stochastic unless
    ``deterministic=True``; ``inverse`` uses conditional means unless ``sample=True``.
    ``density_state`` records whether the densities were trained: ``"untrained"`` after
    conversion, ``"calibrated"`` or ``"fitted"`` after :func:`~flowconvert.calibrate` /
    :func:`~flowconvert.fit` (``flowconvert export`` warns on an untrained one).
    """

    @property
    def density_state(self) -> str:
        return self.__dict__.get("density_state", "untrained")

    @density_state.setter
    def density_state(self, value: str) -> None:
        self.__dict__["density_state"] = value  # a plain attribute for vars(): fc.save writes it
        report = self.__dict__.get("report")
        if report is not None:  # the conversion report says whether the densities are fitted
            report.calibrated = value != "untrained"

    def __init__(self, plan: FlowPlan, layers: Mapping[str, FlowLayer], bases: Mapping[str, nn.Module]):
        super().__init__()
        self.plan = plan
        self.layers = nn.ModuleDict(dict(layers))
        self.bases = nn.ModuleDict(dict(bases))
        self._build_graphs()

    # -- generated programs ------------------------------------------------------------------
    def _build_graphs(self) -> None:
        plan = self.plan
        self._collect_noise_shapes()
        graphs = {
            "function_graph": self._function_graph(plan),
            "likelihood_graph": self._likelihood_graph(plan),
            "inverse_graph": self._inverse_graph(plan),
        }
        for name, graph in graphs.items():
            graph.lint()
            # Not registered as submodules: the layers are owned by self.layers/self.bases,
            # so the state dict stays free of duplicates. Rebuilt after unpickling.
            object.__setattr__(self, name, fx.GraphModule(self, graph, class_name=name.title().replace("_", "")))

    @staticmethod
    def _function_graph(plan: FlowPlan) -> fx.Graph:
        g = fx.Graph()
        env = {name: g.placeholder(name) for name, _ in plan.inputs}
        for step in plan.steps:
            args = tuple(env[v] for v in step.inputs)
            env[step.name] = g.create_node("call_module", f"layers.{step.layer}", args, name=step.name)
            _unpack_outputs(g, step, env)
        g.output(fx.node.map_aggregate(plan.outputs, env.__getitem__))
        return g

    def _noise_placeholders(self, g: fx.Graph, shapes: Mapping[str, Shape]) -> dict[str, fx.Node]:
        return {key: g.placeholder(f"noise_{key}", default_value=None) for key in shapes}

    def _likelihood_graph(self, plan: FlowPlan) -> fx.Graph:
        g = fx.Graph()
        env = {name: g.placeholder(name) for name, _ in plan.inputs}
        noise = self._noise_placeholders(g, self.noise_shapes())
        terms: list[fx.Node] = []
        for step in plan.steps:
            layer = _get_attr(g, f"layers.{step.layer}", f"{step.layer}_layer")
            args = (layer, *(env[v] for v in step.inputs))
            if step.sources:  # several inputs: noise by keyword
                pair = g.create_node(
                    "call_method", "call_and_ll", args, {"noise": noise.get(step.layer)}, name=f"{step.name}_and_ll"
                )
            else:
                pair = g.create_node(
                    "call_method", "call_and_ll", (*args, noise.get(step.layer)), name=f"{step.name}_and_ll"
                )
            env[step.name] = g.create_node("call_function", operator.getitem, (pair, 0), name=step.name)
            _unpack_outputs(g, step, env)
            terms.append(g.create_node("call_function", operator.getitem, (pair, 1), name=f"ll_{step.name}"))
        for out in plan.output_names:
            base = _get_attr(g, f"bases.{self._base_key(out)}", f"base_{out}")
            terms.append(g.create_node("call_method", "log_prob", (base, env[out]), name=f"log_base_{out}"))
        # one stacked reduction instead of a chain of small additions
        stacked = g.create_node("call_function", torch.stack, (terms,), name="log_terms")
        log_prob = g.create_node("call_method", "sum", (stacked, 0), name="log_prob")
        g.output((fx.node.map_aggregate(plan.outputs, env.__getitem__), log_prob))
        return g

    def _inverse_graph(self, plan: FlowPlan) -> fx.Graph:
        g = fx.Graph()
        env = {name: g.placeholder(name) for name in plan.output_names}
        sample = g.placeholder("sample", default_value=False)
        noise = self._noise_placeholders(g, self.inverse_noise_shapes())
        for step in reversed(plan.steps):
            layer = _get_attr(g, f"layers.{step.layer}", f"{step.layer}_layer")
            if not (step.sources or step.names):
                env[step.source] = g.create_node(
                    "call_method", "inverse", (layer, env[step.name], sample, noise.get(step.layer)), name=step.source
                )
                continue
            outs = tuple(env[v] for v in (step.names or (step.name,)))
            kwargs = {"sample": sample, "noise": noise.get(step.layer)}
            if not step.sources:
                env[step.source] = g.create_node("call_method", "inverse", (layer, *outs), kwargs, name=step.source)
                continue
            back = g.create_node("call_method", "inverse", (layer, *outs), kwargs, name=f"{step.name}_inverse")
            for i, v in enumerate(step.sources):
                env[v] = g.create_node("call_function", operator.getitem, (back, i), name=v)
        values = tuple(env[name] for name, _ in plan.inputs)
        g.output(values[0] if len(values) == 1 else values)
        return g

    def _base_key(self, output_name: str) -> str:
        return self.plan.base_keys[self.plan.output_names.index(output_name)]

    # -- pickling: graphs are derived data ---------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("function_graph", "likelihood_graph", "inverse_graph", "_noise_shapes", "_inverse_noise_shapes"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._build_graphs()

    # -- shapes and noise -----------------------------------------------------------------------
    @property
    def code(self) -> str:
        """Python source of the likelihood program (``print(flow.code)``)."""
        return self.likelihood_graph.code.lstrip("\n")

    @property
    def exact(self) -> bool:
        """True when every layer's contribution is exact (otherwise log_prob is a bound)."""
        return all(layer.exact for layer in self.layers.values())

    @property
    def exact_inverse(self) -> bool:
        """True when ``flow(flow.inverse(y)) == y`` for every output ``y`` the flow can produce.

        False when a range-limited elementwise layer (Tanh, Sigmoid, ELU, Softplus: its
        ``output_range``) has a layer after it that drops coordinates (one whose inverse draws
        noise: :meth:`inverse_noise_shapes`): the inverse fills the dropped coordinates by
        conditional means, draws or max-minus-gap values, which can leave the activation's
        range; the activation's inverse then clamps them, so the reconstruction maps back to a
        different output. The log-density is unaffected (still exact when :attr:`exact`).
        """
        return not self.approximate_inverse_layers()

    def approximate_inverse_layers(self) -> list[str]:
        """The range-limited layers whose inverse can receive values outside their range (see :attr:`exact_inverse`)."""
        consumers: dict[str, list[Step]] = {}
        for step in self.plan.steps:
            for v in step.inputs:
                consumers.setdefault(v, []).append(step)

        def drops_later(step: Step) -> bool:
            seen, todo = set(), [step]
            while todo:
                s = todo.pop()
                for value in s.names or (s.name,):
                    for nxt in consumers.get(value, ()):
                        if nxt.name in seen:
                            continue
                        seen.add(nxt.name)
                        if nxt.layer in self._inverse_noise_shapes:
                            return True
                        todo.append(nxt)
            return False

        return [
            s.layer
            for s in self.plan.steps
            if getattr(self.layers[s.layer], "output_range", None) is not None and drops_later(s)
        ]

    @property
    def input_shapes(self) -> list[Shape]:
        """Per-sample shapes of the inputs."""
        return [shape for _, shape in self.plan.inputs]

    @property
    def output_shapes(self) -> list[Shape]:
        """Per-sample shapes of the outputs (the latent variables)."""
        return list(self.plan.output_shapes)

    def noise_shapes(self) -> dict[str, Shape]:
        """``{layer name: per-sample shape}`` of the noise each stochastic forward consumes, in graph order."""
        return dict(self._noise_shapes)

    def inverse_noise_shapes(self) -> dict[str, Shape]:
        """``{layer name: per-sample shape}`` of the noise each sampled inverse consumes, in graph order."""
        return dict(self._inverse_noise_shapes)

    def _collect_noise_shapes(self) -> None:
        """Noise shapes depend only on each layer's configuration: computed once per build."""
        forward, inverse = {}, {}
        for step in self.plan.steps:
            layer = self.layers[step.layer]
            shape = layer.noise_shape(step.in_shape)
            if shape is not None:
                forward[step.layer] = tuple(shape)
            shape = layer.inverse_noise_shape(step.out_shape)
            if shape is not None:
                inverse[step.layer] = tuple(shape)
        object.__setattr__(self, "_noise_shapes", forward)
        object.__setattr__(self, "_inverse_noise_shapes", inverse)

    @staticmethod
    def _noise_kwargs(
        shapes: Mapping[str, Shape], noise: Mapping[str, Tensor] | None, draw: bool, like: Tensor
    ) -> dict[str, Tensor]:
        if noise is not None:  # its keys and shapes were checked by validation.check_noise
            return {f"noise_{k}": noise[k] for k in shapes}
        if not draw:
            return {}
        batch = like.shape[0]
        return {f"noise_{k}": torch.randn((batch, *s), dtype=like.dtype, device=like.device) for k, s in shapes.items()}

    # -- boundary checks --------------------------------------------------------------------------
    def _check_inputs(self, inputs: tuple, noise: Mapping[str, Tensor] | None = None) -> int:
        """Shapes and dtypes of the inputs (and of explicit noise) against the recorded ones; the batch size.

        Skipped while torch.export traces the flow (a comparison would fix the symbolic batch size).
        """
        if torch.compiler.is_compiling():
            return -1
        dtype = flow_dtype(self)
        batch = check_batch(inputs, self.input_shapes, dtype, what="input")
        check_noise(noise, self._noise_shapes, batch, dtype)
        return batch

    def _on_empty(self, graph: fx.GraphModule, values: tuple, shapes: Mapping[str, Shape], **kwargs: Any) -> Any:
        """Run ``graph`` on one zero sample and keep none of it: empty results of the right shapes."""
        one = tuple(v.new_zeros((1, *v.shape[1:])) for v in values)
        noise = {f"noise_{k}": one[0].new_zeros((1, *s)) for k, s in shapes.items()}
        with torch.no_grad():
            out = graph(*one, **kwargs, **noise)
        return fx.node.map_aggregate(out, lambda t: t[:0] if isinstance(t, Tensor) else t)

    # -- the public API --------------------------------------------------------------------------
    def forward(self, *inputs: Tensor) -> Any:
        """The original network's outputs (no likelihood)."""
        if self._check_inputs(inputs) == 0:
            return self._on_empty(self.function_graph, inputs, {})
        return self.function_graph(*inputs)

    def forward_with_log_prob(
        self, *inputs: Tensor, deterministic: bool = False, noise: Mapping[str, Tensor] | None = None
    ) -> tuple[Any, Tensor]:
        """``(outputs, log_prob)`` in one pass; ``log_prob`` has shape ``(batch,)``, in nats.

        ``noise=None``: draw standard-normal noise for every entry of :meth:`noise_shapes`
        when ``deterministic=False``, use none (zero noise) when ``deterministic=True``.
        A dict ``{name: (batch, *shape) tensor}`` is used verbatim.
        """
        if self._check_inputs(inputs, noise) == 0:
            return self._on_empty(self.likelihood_graph, inputs, self._noise_shapes)
        kwargs = self._noise_kwargs(self._noise_shapes, noise, not deterministic, inputs[0])
        return self.likelihood_graph(*inputs, **kwargs)

    def log_prob(
        self,
        *inputs: Tensor,
        deterministic: bool = False,
        num_samples: int = 1,
        noise: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Log-density of the inputs, shape ``(batch,)``, in nats.

        Exact when :attr:`exact`; otherwise a stochastic lower bound, and with
        ``num_samples=K > 1`` the importance-weighted bound :math:`\\log\\frac1K\\sum_k e^{L_k}`
        with fresh noise for every k. ``deterministic=True`` evaluates at zero noise.
        """
        check_count("num_samples", num_samples, 1)
        if num_samples == 1 or noise is not None:
            return self.forward_with_log_prob(*inputs, deterministic=deterministic, noise=noise)[1]
        lps = torch.stack(
            [self.forward_with_log_prob(*inputs, deterministic=deterministic)[1] for _ in range(num_samples)]
        )
        return torch.logsumexp(lps, 0) - math.log(num_samples)

    def bits_per_dim(self, data: Any, **kwargs: Any) -> float:
        """Mean bits per dimension on ``data``: :func:`flowconvert.bits_per_dim` of this model.

        Takes the same keywords (``dequantize``, ``num_samples``, ``deterministic``, ``batch_size``).
        """
        from .evaluation import bits_per_dim

        return bits_per_dim(self, data, **kwargs)

    def inverse(
        self,
        *outputs: Tensor,
        sample: bool = False,
        noise: Mapping[str, Tensor] | None = None,
        temperature: float = 1.0,
    ) -> Any:
        """Inputs from outputs (outputs in flattening order; a single tuple is unpacked).

        ``sample=True`` draws what the forward pass dropped (from ``noise`` when given, keys
        and shapes as :meth:`inverse_noise_shapes`); ``sample=False`` uses conditional means.
        ``temperature`` :math:`T` scales every standard-normal draw (given or drawn), as in Glow.
        Returns a tensor for single-input models, a tuple otherwise.
        """
        if len(outputs) == 1 and isinstance(outputs[0], (tuple, list)):
            outputs = tuple(outputs[0])
        batch = -1
        if not torch.compiler.is_compiling():  # see _check_inputs
            dtype = flow_dtype(self)
            batch = check_batch(outputs, self.output_shapes, dtype, what="output")
            check_noise(noise, self._inverse_noise_shapes, batch, dtype)
        if batch == 0:
            return self._on_empty(self.inverse_graph, outputs, self._inverse_noise_shapes, sample=False)
        kwargs = self._noise_kwargs(self._inverse_noise_shapes, noise, sample, outputs[0])
        if sample and temperature != 1.0:
            kwargs = {k: v * temperature for k, v in kwargs.items()}
        return self.inverse_graph(*outputs, sample=sample, **kwargs)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, noise: Mapping[str, Tensor] | None = None) -> Any:
        """``n`` draws from the model: base samples mapped through the sampled inverse.

        ``temperature`` :math:`T` scales every standard-normal draw, of the bases and of the
        conditionals of dropped coordinates (``T < 1``: samples closer to the modes).
        """
        check_count("n", n, 0)
        z = [self.bases[self._base_key(name)].sample(n, temperature=temperature) for name in self.plan.output_names]
        return self.inverse(*z, sample=True, noise=noise, temperature=temperature)

    @classmethod
    def from_layer(cls, layer: FlowLayer, input_shape: Sequence[int], name: str = "layer") -> FlowModel:
        """One flow layer as a flow: a standard-normal base density on its output.

        The layer (and its noise entry, when it consumes noise) is named ``name``.
        """
        from .densities import StandardNormal

        in_shape = tuple(int(s) for s in input_shape)
        ref = next(iter(layer.parameters()), next(iter(layer.buffers()), None))
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
        with torch.no_grad():
            out_shape = tuple(layer(torch.zeros(1, *in_shape, dtype=dtype)).shape[1:])
        out = f"{name}_out"
        plan = FlowPlan(
            inputs=[("x", in_shape)],
            steps=[Step(out, name, "x", in_shape, out_shape)],
            outputs=out,
            output_names=[out],
            output_shapes=[out_shape],
            base_keys=[out],
        )
        return cls(plan, {name: layer}, {out: StandardNormal(out_shape).to(dtype)}).train(layer.training)

    def extra_repr(self) -> str:
        ins = ", ".join(str(s) for s in self.input_shapes)
        outs = ", ".join(str(s) for s in self.output_shapes)
        return f"inputs=[{ins}], outputs=[{outs}], exact={self.exact}"
