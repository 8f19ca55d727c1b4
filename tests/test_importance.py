"""Tests for the data-driven importance criteria: `taylor` (Molchanov et al., 2019) and `frs` (Aketi et al., 2020)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widthsearch import build_space, load_model, select_channels
from widthsearch.errors import WidthSearchError
from widthsearch.importance import score_channels
from widthsearch.lrp import AlphaBetaLRP
from widthsearch.space import dependency_graph, root_group

from .test_surgery import X32, randomise


def groups_of(model: nn.Module, example: torch.Tensor):
    """The model's width space and its full-index torch-pruning groups."""
    space = build_space(model, example)
    graph = dependency_graph(model, example)
    modules = dict(model.named_modules())
    return space, {g.name: root_group(graph, modules[g.name], range(g.width)) for g in space.groups}


def image_batches(n: int = 2, size: int = 8, side: int = 32, seed: int = 0, classes: int = 10):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, side, side, generator=gen), torch.randint(0, classes, (size,), generator=gen))
            for _ in range(n)]


class MLP(nn.Module):
    """Two inputs, two hidden units, two classes: small enough to reason about by hand."""

    def __init__(self, hidden_w, hidden_b, out_w, out_b):
        super().__init__()
        self.hidden, self.relu, self.out = nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)
        with torch.no_grad():
            for p, v in ((self.hidden.weight, hidden_w), (self.hidden.bias, hidden_b),
                         (self.out.weight, out_w), (self.out.bias, out_b)):
                p.copy_(torch.tensor(v, dtype=torch.float32))

    def forward(self, x):
        return self.out(self.relu(self.hidden(x)))


def taylor_reference(model: nn.Module, space, batches) -> dict[str, torch.Tensor]:
    """Independent Taylor-FO-BN: gates on the outputs of each group's BNs, by output gradients, in train mode."""
    work = copy.deepcopy(model).train()
    modules = dict(work.named_modules())
    for m in work.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    gated = {g.name: [n for n in g.layers if isinstance(modules[n], nn.BatchNorm2d)] for g in space.groups}
    outputs = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for names in gated.values() for n in names]
    totals = {g.name: torch.zeros(g.width) for g in space.groups}
    for x, y in batches:
        outputs.clear()
        logits = work(x)
        names = list(outputs)
        grads = dict(zip(names, torch.autograd.grad(F.cross_entropy(logits, y), [outputs[n] for n in names])))
        for name, layer_names in gated.items():
            term = sum((outputs[n] * grads[n]).flatten(2).sum(2).sum(0) if outputs[n].dim() > 2
                       else (outputs[n] * grads[n]).sum(0) for n in layer_names)
            totals[name] += term.detach() ** 2
    for h in hooks:
        h.remove()
    return {n: t / len(batches) for n, t in totals.items()}


# --------------------------------------------------------------------------- taylor


def test_taylor_squares_per_batch_so_opposite_batches_do_not_cancel():
    # unit 0 is active on sample A only; A is labelled 0 in one batch and 1 in the other, at a point
    # where both logits are equal (p = 0.5): its gradients are opposite and sum to exactly zero over
    # the two batches, while each batch's Taylor term is large. Unit 1 (sample B, same label in both
    # batches) has a small but consistent term.
    v, u = 2.0, 0.5
    model = MLP([[1, 0], [0, 1]], [0, 0], [[v, u], [-v, 0]], [0, 2 * v])
    a, b = [1.0, 0.0], [0.0, 1.0]
    batches = [(torch.tensor([a, b]), torch.tensor([0, 0])), (torch.tensor([a, b]), torch.tensor([1, 0]))]
    space, groups = groups_of(model, torch.zeros(1, 2))
    assert space.names == ["hidden"]

    summed = copy.deepcopy(model)  # premise: the gradient of unit 0's parameters sums to zero over the batches
    for x, y in batches:
        F.cross_entropy(summed(x), y).backward()
    assert summed.hidden.weight.grad[0].abs().max() < 1e-6 and summed.out.weight.grad[:, 0].abs().max() < 1e-6
    assert summed.hidden.weight.grad[1].abs().max() > 1e-2

    scores = score_channels("taylor", model, groups, batches)["hidden"]
    # per batch, term_k = sum_n y_k dL/dy_k (mean loss over 2 samples): unit 0 is -v/2 then +v/2
    p0 = torch.softmax(model(torch.tensor([b]))[0], 0)[0].item()
    torch.testing.assert_close(scores, torch.tensor([(v / 2) ** 2, (u * (p0 - 1) / 2) ** 2]))
    assert scores[0] > scores[1]
    assert select_channels(model, space, {"hidden": 1}, "taylor", batches=batches) == {"hidden": [0]}


def test_taylor_squares_the_sum_over_the_filter_not_the_sum_of_magnitudes():
    # unit 0's two large weights nearly cancel (output 0.1); unit 1 outputs 1 from a small weight.
    # Sum of |w * dL/dw| ranks unit 0 far above unit 1; the filter's Taylor term (0.1 d)^2 vs d^2
    # ranks it below.
    model = MLP([[10.0, -9.9], [1.0, 0.0]], [0, 0], [[1, 1], [-1, -1]], [0, 0])
    x, y = torch.tensor([[1.0, 1.0]]), torch.tensor([1])
    space, groups = groups_of(model, torch.zeros(1, 2))
    scores = score_channels("taylor", model, groups, [(x, y)])["hidden"]
    d = 2 * (torch.softmax(model(x)[0], 0)[0].item())  # dL/dy, the same for both units
    torch.testing.assert_close(scores, torch.tensor([(0.1 * d) ** 2, d ** 2]), rtol=1e-4, atol=0)
    assert select_channels(model, space, {"hidden": 1}, "taylor", batches=[(x, y)]) == {"hidden": [1]}


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20"])
def test_taylor_equals_train_mode_gate_reference(name):
    model = randomise(load_model(name), negative=0.2)
    space, groups = groups_of(model, X32)
    batches = image_batches(side=16)
    scores = score_channels("taylor", model, groups, batches)
    expected = taylor_reference(model, space, batches)
    for g in space.groups:  # residual groups sum their BNs' terms before squaring
        torch.testing.assert_close(scores[g.name], expected[g.name], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("training", [False, True])
def test_taylor_leaves_model_state_alone(training):
    model = randomise(load_model("small_cnn"), negative=0.2).train(training)
    space, groups = groups_of(model, X32)
    model.features[1].weight.requires_grad_(False)  # a frozen BN scale is still scored, and stays frozen
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_channels("taylor", model, groups, image_batches(side=16))
    after = model.state_dict()
    for k, v in before.items():  # BN running statistics (and num_batches_tracked) untouched
        assert torch.equal(after[k], v), k
    assert model.training is training
    assert not model.features[1].weight.requires_grad and model.features[0].weight.requires_grad
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 3.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert (scores["features.0"] > 0).all()


def test_taylor_needs_bn_scale_and_shift():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    _, groups = groups_of(model, X32)
    with pytest.raises(WidthSearchError, match="'taylor' needs the scale and shift of BatchNorm '1' "
                                               "\\(it has affine=False\\)"):
        score_channels("taylor", model, groups, image_batches(n=1))


# --------------------------------------------------------------------------- frs


class TinyRes(nn.Module):
    """conv-BN-ReLU, then a residual conv-BN branch added to it, average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(3, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn2(self.conv2(h)) + h)), 1))


def safe(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def dense_alpha_beta(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, alpha=2.0, beta=1.0) -> torch.Tensor:
    """R_i = sum_j (alpha z_ij+ / sum_i z_ij+ - beta z_ij- / sum_i z_ij-) R_j for z_ij = w_ji x_i (dense)."""
    z = w * x[None, :]
    zp, zn = z.clamp(min=0), z.clamp(max=0)
    return (alpha * safe(zp, zp.sum(1, keepdim=True)) * r[:, None]
            - beta * safe(zn, zn.sum(1, keepdim=True)) * r[:, None]).sum(0)


def folded_conv_matrix(conv: nn.Conv2d, bn: nn.BatchNorm2d, shape) -> torch.Tensor:
    """The bias-free conv as a dense (out, in) matrix, rows scaled by the BN factor gamma / sqrt(var + eps)."""
    cols = torch.eye(int(torch.tensor(shape).prod())).view(-1, *shape)
    matrix = F.conv2d(cols, conv.weight, None, conv.stride, conv.padding).flatten(1).T
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (scale.repeat_interleave(matrix.shape[0] // len(scale))[:, None] * matrix).detach()


def tiny_res_relevance(model: TinyRes, x: torch.Tensor, y: int):
    """Per-sample LRP-alpha-beta of TinyRes by hand: relevance of h (bn1's map), of the branch (bn2's map), of x."""
    with torch.no_grad():
        bn = lambda m, u, c: (u.view(c, -1) - m.running_mean[:, None]) / torch.sqrt(m.running_var[:, None] + m.eps) \
            * m.weight[:, None] + m.bias[:, None]
        m1 = folded_conv_matrix(model.conv1, model.bn1, x.shape)
        m2 = folded_conv_matrix(model.conv2, model.bn2, (3, *x.shape[1:]))
        h = torch.relu(bn(model.bn1, F.conv2d(x[None], model.conv1.weight, padding=1)[0], 3)).flatten()
        branch = bn(model.bn2, F.conv2d(h.view(1, 3, *x.shape[1:]), model.conv2.weight, padding=1)[0], 3).flatten()
        s = branch + h
        o = torch.relu(s).view(3, -1)
        pooled = o.mean(1)
        r_pooled = dense_alpha_beta(pooled, model.fc.weight, F.one_hot(torch.tensor(y), 4).float())
        r_s = (safe(o, o.sum(1, keepdim=True)) * r_pooled[:, None]).flatten()  # average pool: proportional
        r_branch, r_skip = safe(branch, s) * r_s, safe(h, s) * r_s  # the addition: proportional
        r_h = r_skip + dense_alpha_beta(h, m2, r_branch)
        r_x = dense_alpha_beta(x.flatten(), m1, r_h)
    return r_h.view(3, -1).sum(1), r_branch.view(3, -1).sum(1), r_x.view(x.shape)


def test_frs_equals_dense_lrp_alpha_beta_by_hand():
    torch.manual_seed(0)
    model = TinyRes()
    randomise(model, seed=1, negative=0.2)
    with torch.no_grad():
        model.bn1.weight[1] = -0.8  # folding a negative BN scale swaps positive and negative parts
    space, groups = groups_of(model, torch.zeros(1, 2, 4, 4))
    assert len(space.groups) == 1
    (name,) = space.names
    assert {"bn1", "bn2"} <= set(space[name].layers)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 2, 4, 4, generator=gen), torch.tensor(labels)) for labels in ([0, 1, 1, 2, 0],
                                                                                             [1, 1, 2, 0, 2])]
    # per-sample relevance of the tapped maps and of the input, against the hand computation
    lrp = AlphaBetaLRP(model, [model.bn1, model.bn2])
    x, y = batches[0]
    result = lrp(x, y)
    for i in range(len(y)):
        r_h, r_branch, r_x = tiny_res_relevance(model, x[i], int(y[i]))
        torch.testing.assert_close(result.layers[model.bn1][i].flatten(1).sum(1), r_h, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result.layers[model.bn2][i].flatten(1).sum(1), r_branch, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result.input[i], r_x, rtol=1e-4, atol=1e-6)

    # the score: class means weighted by sigmoid(max accuracy / accuracy), averaged over the classes
    # present (3 of 4), absolute, L2-normalised per map, averaged over the group's two maps
    per_map = {"h": torch.zeros(4, 3), "branch": torch.zeros(4, 3)}
    count, right = torch.zeros(4), torch.zeros(4)
    for x, y in batches:
        pred = model(x).argmax(1)
        for i, c in enumerate(y.tolist()):
            r_h, r_branch, _ = tiny_res_relevance(model, x[i], c)
            per_map["h"][c] += r_h
            per_map["branch"][c] += r_branch
            count[c] += 1
            right[c] += float(pred[i] == c)
    accuracy = right / count.clamp(min=1)
    weight = torch.tensor([torch.sigmoid(accuracy.max() / a) if a > 0 else 1.0 for a in accuracy]) * (count > 0)
    expected = 0
    for total in per_map.values():
        score = ((weight / 3)[:, None] * total / count.clamp(min=1)[:, None]).sum(0).abs()
        expected = expected + score / score.norm() / 2
    scores = score_channels("frs", model, groups, batches)
    torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-6)


def test_frs_keeps_a_channel_with_large_negative_relevance():
    # four identical positive channels; the true class weighs channel 0 by -5 and the others by
    # 0.1, 0.2, 0.3. LRP-alpha-beta gives channel 0 relevance -beta = -1 and the others
    # alpha * (1, 2, 3) / 6: by magnitude channel 1 matters least, channel 0 not at all least.
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[5].weight.copy_(torch.tensor([[-5.0, 0.1, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0]]))
        model[5].bias.zero_()
    space, groups = groups_of(model, X32)
    batches = [(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(4, dtype=torch.long))]
    scores = score_channels("frs", model, groups, batches)["0"]
    expected = torch.tensor([1.0, 1 / 3, 2 / 3, 1.0])
    torch.testing.assert_close(scores, expected / expected.norm(), rtol=1e-4, atol=1e-6)
    assert select_channels(model, space, {"0": 3}, "frs", batches=batches) == {"0": [0, 2, 3]}


@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0)])
def test_lrp_conserves_relevance_on_signed_layers(alpha, beta):
    # signed inputs and weights: every output has positive and negative contributions, so
    # (alpha - beta) = 1 of the output relevance reaches the input exactly
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    randomise(model, negative=0.2)
    x, y = torch.randn(7, 3, 6, 6), torch.randint(0, 5, (7,))
    result = AlphaBetaLRP(model, [model[1]], alpha=alpha, beta=beta)(x, y)
    torch.testing.assert_close(result.input.flatten(1).sum(1), torch.ones(7), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.layers[model[1]].flatten(1).sum(1), torch.ones(7), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20"])
def test_lrp_conserves_relevance_through_real_models(name):
    # alpha=1, beta=0: relevance is lost only at outputs with no positive contribution (rare
    # here), through BN folding, ReLUs, pools, residual additions and flatten
    model = randomise(load_model(name), negative=0.2)
    x, y = image_batches(n=1, size=4, side=16)[0]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    result = AlphaBetaLRP(model, bns, alpha=1.0, beta=0.0)(x, y)
    torch.testing.assert_close(result.input.flatten(1).sum(1), torch.ones(4), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(result.logits, model(x))


def test_lrp_alpha_beta_must_differ_by_one():
    with pytest.raises(WidthSearchError, match="alpha - beta = 1 and beta >= 0, got alpha=3.0, beta=1.0"):
        AlphaBetaLRP(nn.Linear(2, 2), alpha=3.0, beta=1.0)


def test_frs_names_a_layer_without_a_rule():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10))
    _, groups = groups_of(model, X32)
    with pytest.raises(WidthSearchError, match="no rule for GELU '2'"):
        score_channels("frs", model, groups, image_batches(n=1))


def test_frs_needs_a_traceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            h = self.conv(x)
            if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                h = h * 2
            return self.fc(h.mean((2, 3)))

    model = Branchy()
    _, groups = groups_of(model, X32)
    with pytest.raises(WidthSearchError, match="needs a model torch.fx can trace; Branchy cannot be traced"):
        score_channels("frs", model, groups, image_batches(n=1))


# --------------------------------------------------------------------------- both, on the built-in models


@pytest.mark.parametrize("criterion", ["taylor", "frs"])
@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_mobilenetv2"])
def test_data_criteria_score_every_channel(name, criterion):
    model = randomise(load_model(name), negative=0.2)
    space, groups = groups_of(model, X32)
    scores = score_channels(criterion, model, groups, image_batches(n=2, size=4, side=16))
    assert set(scores) == set(space.names)
    for g in space.groups:
        s = scores[g.name]
        assert s.shape == (g.width,) and torch.isfinite(s).all() and (s >= 0).all(), g.name
        assert s.max() > 0, g.name


def test_a_criterion_name_is_registered_once():
    from widthsearch.importance import CRITERIA, register

    with pytest.raises(WidthSearchError, match="importance criterion 'l1' is already registered"):
        register("l1")(lambda model, groups, batches, seed: {})
    assert CRITERIA["l1"].name == "l1"
