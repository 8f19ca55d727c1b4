"""Layer-wise relevance propagation (LRP) with the alpha-beta rule on torch.fx-traceable CNNs.

Used by the `frs` importance criterion (Aketi et al., 2020, whose code applies LRP-alpha-beta
with alpha=2, beta=1 to VGG and ResNet). The model is traced with torch.fx; one eval-mode
forward records every node's value; relevance starts as a one-hot of the target class at the
model's output (the logits; the softmax is not traversed, as in the authors' code) and flows
back node by node in reverse topological order, summed where a value feeds several consumers.

Rules (Bach et al., 2015; Montavon et al., 2017), per node kind:

* Conv1d/2d/3d and Linear: alpha-beta on the contributions z_ij = x_i w_ij (bias left out, as
  in the authors' code), R_i = sum_j (alpha z_ij+ / z_j+ - beta z_ij- / z_j-) R_j, with
  alpha - beta = 1. The sign is the sign of the contribution x_i w_ij; the authors split by
  the sign of the weight, which is the same on the non-negative inputs that follow a ReLU but
  not on signed inputs (the image, MobileNetV2's linear bottlenecks): we follow the rule's
  definition there. An output with no positive (negative) contribution passes no alpha
  (beta) share, as in the usual implementations.
* BatchNorm directly after a conv/linear (its only consumer) is folded into it
  (w_j * gamma_j / sqrt(var_j + eps)); the authors pass relevance through BatchNorm
  unchanged and apply the rule to the raw conv weights, which is the same except for
  channels with a negative gamma, whose positive and negative parts folding swaps, as the
  composite linear map requires. Any other BatchNorm passes relevance unchanged (theirs).
* ReLU, ReLU6, Dropout, Identity pass relevance unchanged (the authors' ReLU rule); flatten,
  view and reshape reshape it.
* Additions and average pools split relevance in proportion to each input's contribution
  (the z-rule; the authors' residual split); max pools give it to the maximum. The authors'
  average-pool rule multiplies relevance by the window area; that constant factor is
  dropped (relevance is conserved) and does not change per-layer normalised scores.

Any other layer or operation raises WidthSearchError naming it.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import WidthSearchError

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Dropout, nn.Identity)
_SPLIT_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                  nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_LINEAR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# rules of functions and tensor methods: pass relevance, reshape it, or split it (z-rule)
_FUNCTION_RULES = {F.relu: "pass", F.relu6: "pass", torch.relu: "pass", F.dropout: "pass",
                   torch.flatten: "reshape", torch.reshape: "reshape",
                   operator.add: "split", operator.iadd: "split", torch.add: "split", torch.mean: "split",
                   F.adaptive_avg_pool2d: "split", F.avg_pool2d: "split", F.max_pool2d: "split"}
_METHOD_RULES = {"relu": "pass", "contiguous": "pass", "view": "reshape", "reshape": "reshape",
                 "flatten": "reshape", "add": "split", "mean": "split"}
_NOT_INPLACE = {operator.iadd: operator.add}


@dataclass
class Relevance:
    """One batch's LRP result: the model's output, and relevance at the input and at the tapped layers' outputs."""

    logits: torch.Tensor
    input: torch.Tensor
    layers: dict[nn.Module, torch.Tensor]


class AlphaBetaLRP:
    """LRP-alpha-beta of `model` (traced once), reporting relevance at the outputs of `taps`.

    Call it with a batch and its target classes; the model is run as it is (put it in eval
    mode first). Raises WidthSearchError when the model cannot be traced or when relevance
    reaches a layer without a rule.
    """

    def __init__(self, model: nn.Module, taps: Iterable[nn.Module] = (), alpha: float = 2.0, beta: float = 1.0):
        if alpha - beta != 1 or beta < 0:
            raise WidthSearchError(f"LRP alpha-beta needs alpha - beta = 1 and beta >= 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta = alpha, beta
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as e:
            raise WidthSearchError(f"layer-wise relevance propagation needs a model torch.fx can trace; "
                                   f"{type(model).__name__} cannot be traced: {type(e).__name__}: {e}") from e
        wanted = set(taps)
        self.taps = {node: self.gm.get_submodule(node.target) for node in self.gm.graph.nodes
                     if node.op == "call_module" and self.gm.get_submodule(node.target) in wanted}

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Relevance:
        with _not_inplace(self.gm), torch.no_grad():
            recorder = _Recorder(self.gm)
            logits = recorder.run(x)
            env = recorder.env
            (out,) = [n.args[0] for n in self.gm.graph.nodes if n.op == "output"]
            if not isinstance(out, fx.Node) or not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise WidthSearchError("layer-wise relevance propagation needs a model whose output is one "
                                       "(batch, classes) tensor")
            relevance = {out: F.one_hot(target, logits.shape[1]).to(logits.dtype)}
            folded: dict[fx.Node, torch.Tensor] = {}
            layers: dict[nn.Module, torch.Tensor] = {}
            source = torch.zeros_like(x)
            for node in reversed(self.gm.graph.nodes):
                r = relevance.pop(node, None)
                if r is None:
                    continue
                if node in self.taps:
                    module = self.taps[node]
                    layers[module] = layers[module] + r if module in layers else r
                if node.op == "placeholder":
                    source = r
                    continue
                for parent, share in self._propagate(node, r, env, folded):
                    relevance[parent] = relevance[parent] + share if parent in relevance else share
        return Relevance(logits, source, layers)

    # -- rules ---------------------------------------------------------------------------
    def _propagate(self, node: fx.Node, r: torch.Tensor, env: dict, folded: dict) -> list[tuple[fx.Node, torch.Tensor]]:
        if node.op == "get_attr":
            return []  # a constant absorbs its share
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            src = node.args[0]
            if isinstance(module, _LINEAR_MODULES):
                return [(src, self._alpha_beta(module, env[src], r, folded.get(node)))]
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                scale = _bn_scale(module)
                if scale is not None and _foldable(self.gm, src):
                    folded[src] = scale
                return [(src, r)]
            if isinstance(module, _PASS_MODULES):
                return [(src, r)]
            if isinstance(module, nn.Flatten):
                return [(src, r.reshape(env[src].shape))]
            if isinstance(module, _SPLIT_MODULES):
                return _split(node, r, env, module)
            raise WidthSearchError(f"layer-wise relevance propagation has no rule for {type(module).__name__} "
                                   f"{node.target!r}")
        if node.op == "call_function":
            rule, what = _FUNCTION_RULES.get(node.target), f"function {getattr(node.target, '__name__', node.target)!r}"
        else:
            rule, what = _METHOD_RULES.get(node.target), f"method {node.target!r}"
        if rule == "pass":
            return [(node.args[0], r)]
        if rule == "reshape":
            return [(node.args[0], r.reshape(env[node.args[0]].shape))]
        if rule == "split":
            return _split(node, r, env, None)
        raise WidthSearchError(f"layer-wise relevance propagation has no rule for {what} (node {node.name!r})")

    def _alpha_beta(self, module: nn.Module, x: torch.Tensor, r: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """R_i = sum_j (alpha z_ij+ / z_j+ - beta z_ij- / z_j-) R_j, by the gradient of the split linear map."""
        w = module.weight.detach()
        if scale is not None:
            w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
        layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            (lambda a, v: F.linear(a, v)) if isinstance(module, nn.Linear)
            else (lambda a, v: module._conv_forward(a, v, None)))
        w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
        with torch.enable_grad():
            x_pos, x_neg = x.clamp(min=0).requires_grad_(), x.clamp(max=0).requires_grad_()
            z_pos = layer(x_pos, w_pos) + layer(x_neg, w_neg)  # sum of the positive contributions
            z_neg = layer(x_pos, w_neg) + layer(x_neg, w_pos)  # sum of the negative contributions
            g_pos, g_neg = torch.autograd.grad(
                (z_pos, z_neg), (x_pos, x_neg),
                grad_outputs=(self.alpha * _safe_div(r, z_pos.detach()), -self.beta * _safe_div(r, z_neg.detach())))
        return x_pos.detach() * g_pos + x_neg.detach() * g_neg


def _split(node: fx.Node, r: torch.Tensor, env: dict, module: nn.Module | None) -> list[tuple[fx.Node, torch.Tensor]]:
    """z-rule for a parameter-free op: input i gets x_i * d out / d x_i * R / out (proportional shares)."""
    inputs = {n: env[n].detach().clone().requires_grad_() for n in node.all_input_nodes
              if isinstance(env[n], torch.Tensor) and env[n].is_floating_point()}
    with torch.enable_grad():
        args = fx.node.map_arg(node.args, lambda n: inputs.get(n, env[n]))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: inputs.get(n, env[n]))
        if module is not None:
            out = module(*args, **kwargs)
        elif node.op == "call_function":
            out = _NOT_INPLACE.get(node.target, node.target)(*args, **kwargs)
        else:
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        grads = torch.autograd.grad(out, list(inputs.values()), grad_outputs=_safe_div(r, out.detach()),
                                    allow_unused=True)
    return [(n, x.detach() * g) for (n, x), g in zip(inputs.items(), grads) if g is not None]


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b, and 0 where b is 0."""
    zero = b == 0
    return torch.where(zero, torch.zeros_like(a), a / torch.where(zero, torch.ones_like(b), b))


def _foldable(gm: fx.GraphModule, src) -> bool:
    """True when `src` is a conv/linear call whose only consumer is the BatchNorm being visited."""
    return (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
            and isinstance(gm.get_submodule(src.target), _LINEAR_MODULES))


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor | None:
    """The per-channel factor an eval-mode BatchNorm applies, gamma / sqrt(running var + eps) (None: no factor)."""
    if bn.weight is None and bn.running_var is None:
        return None
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    var = bn.running_var if bn.running_var is not None else torch.ones_like(gamma)
    return gamma / torch.sqrt(var + bn.eps)


class _Recorder(fx.Interpreter):
    """Runs the traced model keeping every node's value; in-place functions run out of place."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)

    def call_function(self, target, args, kwargs):
        kwargs = {**kwargs, "inplace": False} if "inplace" in kwargs else kwargs
        return super().call_function(_NOT_INPLACE.get(target, target), args, kwargs)


@contextlib.contextmanager
def _not_inplace(model: nn.Module) -> Iterator[None]:
    """Turn off `inplace` of every module (ReLU(inplace=True) would overwrite recorded values)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True
