"""The loss's autograd graph: trainable tensors outside the monitored model (a GAN), the
torch loss it computes, its terms and the output it reads (TL601, TL302 in a Monitor)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint.engine import RULES, load_rules
from trainlint.lossgraph import (
    LossGraph,
    item_mean,
    output_nodes,
    read_loss_graph,
    summed_over_items,
)

load_rules()


def _gan() -> tuple:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    critic = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    return generator, critic


def test_the_loss_graph_names_what_lies_outside_the_model() -> None:
    generator, critic = _gan()
    z = torch.randn(8, 4)
    loss = critic(generator(z)).mean()
    loss.backward()  # the graph is read after the backward, as Monitor.step reads it
    assert read_loss_graph(loss, generator.parameters()).foreign == 4  # the critic's 2 + 2
    assert read_loss_graph(loss, [*generator.parameters(), *critic.parameters()]).foreign == 0
    assert read_loss_graph(loss.detach(), generator.parameters()).foreign == 0
    own = F.mse_loss(generator(z), torch.zeros(8, 2))
    assert read_loss_graph(own, generator.parameters()).foreign == 0
    # A leaf the forward makes each step (transformers' MRA attention on a CPU returns
    # zeros_like(query).requires_grad_()) is no other network.
    hidden = generator(z)
    placeholder = F.mse_loss(hidden + torch.zeros_like(hidden).requires_grad_(),
                             torch.zeros(8, 2))
    assert read_loss_graph(placeholder, generator.parameters()).foreign == 0


def test_a_loss_at_chance_beside_a_leaf_made_in_the_forward_is_judged() -> None:
    """MRA's placeholder leaf made TL603 skip an unlearnable run as a GAN's."""

    class Placeholder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            return self.b(h + torch.zeros_like(h).requires_grad_())

    torch.manual_seed(0)
    model = Placeholder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Labels independent of the inputs: nothing to learn.
    report = _trained(model, opt, steps=100, every=10, classes=4)
    assert report.trace.foreign_params == 0
    assert "TL603" in _codes(report)


@pytest.mark.parametrize("alternate, watched", [(True, "g"), (True, "d"), (False, "g")])
def test_one_monitor_on_a_gan_in_one_module_does_not_judge_the_level(alternate: bool,
                                                                     watched: str) -> None:
    """A GAN's generator and discriminator in one watched module (Lightning's default), each
    with its optimizer stepping after a backward of its own: the generator's loss heads to
    ln 2 as the discriminator improves, which is no stall; nor is the discriminator's at 2 ln 2
    (given to step instead: its graph never reaches the generator, but the generator's
    backward runs through the discriminator). Two optimizers stepping after one backward
    (parts of one model) train one loss, which is judged."""
    generator, critic = _gan()
    both = nn.ModuleDict({"G": generator, "D": critic})
    gen_opt = torch.optim.Adam(generator.parameters(), lr=1e-4)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(both, [gen_opt, critic_opt], every=1) as monitor:
        for _ in range(RULES["TL603"].defaults["min_points"] + 2):
            real = torch.randn(16, 2, generator=g) + 3
            fake = generator(torch.randn(16, 4, generator=g))
            if alternate:
                d_loss = F.softplus(-critic(real)).mean() + F.softplus(critic(fake.detach())).mean()
                critic_opt.zero_grad()
                d_loss.backward()
                critic_opt.step()
                loss = F.softplus(-critic(fake)).mean()
                watched_loss = d_loss if watched == "d" else loss
            else:  # one loss, one backward, both optimizers step it
                loss = watched_loss = F.mse_loss(critic(fake), torch.ones(16, 1))
            gen_opt.zero_grad()
            critic_opt.zero_grad()
            loss.backward()
            gen_opt.step()
            if not alternate:
                critic_opt.step()
            monitor.step(watched_loss)
        report = monitor.report()
    assert report.trace.alternating is alternate
    if alternate:
        assert "two optimizers stepped one after the other" in report.skipped["TL603"]
    else:
        assert "TL603" not in report.skipped or "compete" not in report.skipped["TL603"]


def test_an_online_probe_with_its_own_optimizer_does_not_hide_a_stuck_loss() -> None:
    """SimCLR-style: a linear probe on detached features, with its own optimizer and its own
    backward after the model's. The model's loss never reaches the probe's parameters: no
    competition, and a loss stuck at chance (labels shuffled in each batch) is reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 10))
    probe = nn.Linear(32, 10)
    both = nn.ModuleDict({"model": model, "probe": probe})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(both, [opt, probe_opt], every=10) as monitor:
        for _ in range(200):
            x, y = torch.randn(64, 6, generator=g), torch.randint(0, 10, (64,), generator=g)
            loss = F.cross_entropy(model(x), y)  # labels unrelated to x: nothing to learn
            opt.zero_grad()
            loss.backward()
            opt.step()
            probe_loss = F.cross_entropy(probe(model[:2](x).detach()), y)
            probe_opt.zero_grad()
            probe_loss.backward()
            probe_opt.step()
            monitor.step(loss)
        report = monitor.report()
    assert not report.trace.alternating
    assert "TL603" in _codes(report)


def test_a_monitored_generator_is_not_judged_by_its_rising_loss() -> None:
    """Its adversarial loss rises as the critic improves (TL603 must not call that 'not
    learning'); nor is the critic's, when the generator's Monitor finds its loss running
    through the critic: the critic's loss swings as the generator fools it (DCGAN's from 0.015
    to 2), and a Monitor on the critic alone judges it."""
    generator, critic = _gan()
    gen_opt = torch.optim.Adam(generator.parameters(), lr=1e-4)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(generator, gen_opt, every=1) as watch_gen, \
            trainlint.Monitor(critic, critic_opt, every=1) as watch_critic:
        for _ in range(RULES["TL603"].defaults["min_points"] + 2):  # TL603 runs
            real = torch.randn(16, 2, generator=g) + 3
            fake = generator(torch.randn(16, 4, generator=g))
            critic_loss = (F.softplus(-critic(real)) + F.softplus(critic(fake.detach()))).mean()
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
            watch_critic.step(critic_loss)
            gen_loss = F.softplus(-critic(fake)).mean()
            gen_opt.zero_grad()
            gen_loss.backward()
            gen_opt.step()
            watch_gen.step(gen_loss)
        gen_report, critic_report = watch_gen.report(), watch_critic.report()
    assert gen_report.trace.foreign_params == 4
    assert critic_report.trace.foreign_params == 0
    assert any("TL603" in note and "compete" in note for note in gen_report.notes)
    assert any("TL603" in note and "another Monitor's loss runs through this model" in note
               for note in critic_report.notes)


# ----------------------------------------------------------------------------- the loss's kind
def _outputs(*tensors: torch.Tensor) -> list:
    """One forward's outputs as the probe records them: ``[[(grad_fn, shape), ...]]``."""
    return [[(t.grad_fn, tuple(t.shape)) for t in tensors]]


def _head(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, classes))


def _after_backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()  # read after the backward, as Monitor.step reads it
    return loss


def test_cross_entropy_on_logits_is_known_with_its_classes_and_output() -> None:
    model, y = _head(), torch.randint(0, 10, (8,))
    hidden = model[:2](torch.randn(8, 6))
    logits = model[2](hidden)
    loss = _after_backward(F.cross_entropy(logits, y))
    graph = read_loss_graph(loss, model.parameters(), _outputs(hidden, logits))
    assert (graph.kind, graph.reduction, graph.terms) == ("cross_entropy", "mean", 1)
    assert (graph.num_classes, graph.output_index, graph.reads_output) == (10, 1, True)
    assert graph.foreign == 0


def test_nll_of_the_models_own_log_probabilities_is_not_cross_entropy() -> None:
    model, y = _head(), torch.randint(0, 10, (8,))
    log_probs = F.log_softmax(model(torch.randn(8, 6)), dim=1)
    graph = read_loss_graph(_after_backward(F.nll_loss(log_probs, y, reduction="sum")),
                            model.parameters(), _outputs(log_probs))
    assert (graph.kind, graph.reduction, graph.num_classes, graph.output_index) == \
        ("nll", "sum", 10, 0)
    again = F.log_softmax(model(torch.randn(8, 6)), dim=1)  # cross_entropy applies it again
    graph = read_loss_graph(_after_backward(F.cross_entropy(again, y)), model.parameters(),
                            _outputs(again))
    assert (graph.kind, graph.output_index) == ("cross_entropy", 0)


def test_a_loss_on_something_computed_from_the_output_does_not_read_the_output() -> None:
    model, y = _head(), torch.randint(0, 10, (8,))
    probs = torch.softmax(model(torch.randn(8, 6)), dim=1)
    graph = read_loss_graph(_after_backward(F.nll_loss(torch.log(probs), y)),
                            model.parameters(), _outputs(probs))
    assert (graph.kind, graph.output_index, graph.reads_output) == ("nll", None, False)


def test_the_output_and_the_classes_are_found_through_reshapes() -> None:
    """A language model's (B, T, V) logits viewed as (B*T, V): the output is found through
    the view, and the classes are those of what the loss read (V), not the output's dim 1."""
    torch.manual_seed(0)
    lm = nn.Linear(6, 11)
    logits = lm(torch.randn(2, 5, 6))
    loss = _after_backward(F.cross_entropy(logits.float().view(-1, 11),
                                           torch.randint(0, 11, (10,))))
    graph = read_loss_graph(loss, lm.parameters(), _outputs(logits))
    assert (graph.kind, graph.output_index, graph.num_classes) == ("cross_entropy", 0, 11)
    seg = nn.Conv2d(3, 4, 1)  # per-pixel classes: (N, C, H, W), C = 4
    maps = seg(torch.randn(2, 3, 5, 5))
    graph = read_loss_graph(_after_backward(F.cross_entropy(maps, torch.randint(0, 4, (2, 5, 5)))),
                            seg.parameters(), _outputs(maps))
    assert (graph.kind, graph.num_classes, graph.output_index) == ("cross_entropy", 4, 0)


def test_other_losses_terms_and_unknown_outputs() -> None:
    model = _head(1)
    logits = model(torch.randn(8, 6))
    bce = _after_backward(F.binary_cross_entropy_with_logits(logits.squeeze(1), torch.ones(8)))
    graph = read_loss_graph(bce, model.parameters(), _outputs(logits))
    assert (graph.kind, graph.output_index) == ("bce_with_logits", 0)
    out = model(torch.randn(8, 6))
    mse = _after_backward(F.mse_loss(out, torch.zeros(8, 1)))
    assert read_loss_graph(mse, model.parameters(), _outputs(out)).kind == "mse"
    main, aux = _head(), _head()
    x, y = torch.randn(8, 6), torch.randint(0, 10, (8,))
    a, b = main(x), aux(x)
    both = _after_backward(F.cross_entropy(a, y) + 0.3 * F.cross_entropy(b, y))
    graph = read_loss_graph(both, [*main.parameters(), *aux.parameters()], _outputs(a, b))
    assert (graph.kind, graph.terms, graph.output_index) == ("cross_entropy", 2, 0)
    # Without the model's outputs a log_softmax inside the loss cannot be told from the
    # model's own: the kind stays unknown.
    c = main(x)
    graph = read_loss_graph(_after_backward(F.cross_entropy(c, y)), main.parameters(), [])
    assert (graph.kind, graph.terms, graph.reads_output) == (None, 1, None)
    assert read_loss_graph((c * 0).sum().detach(), main.parameters(), _outputs(c)).kind is None


def _trained(model: nn.Module, opt: torch.optim.Optimizer, steps: int, every: int = 1,
             classes: int = 10) -> trainlint.Report:
    """A Monitor's report on ``steps`` steps of cross-entropy on random (x, y) of 6 features
    and ``classes`` classes: labels unrelated to the inputs."""
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=every) as monitor:
        for _ in range(steps):
            x, y = torch.randn(32, 6, generator=g), torch.randint(0, classes, (32,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        return monitor.report()


def _monitored(model: nn.Module, loss_fn, steps: int = 3) -> trainlint.Report:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(steps):
            x, y = torch.randn(32, 6, generator=g), torch.randint(0, 10, (32,), generator=g)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        return monitor.report()


def _codes(report: trainlint.Report) -> set:
    return {f.code for f in report.findings}


def test_a_monitor_finds_softmax_twice_in_the_users_loop() -> None:
    probs = _monitored(nn.Sequential(_head(), nn.Softmax(dim=1)), nn.CrossEntropyLoss())
    assert "TL601" in _codes(probs)
    assert probs.trace.loss_kind == "cross_entropy"
    assert "TL601" not in _codes(_monitored(_head(), nn.CrossEntropyLoss()))
    # The model's probabilities, logged and fed to nll_loss: applied as meant.
    logged = _monitored(nn.Sequential(_head(), nn.Softmax(dim=1)),
                        lambda p, y: F.nll_loss(torch.log(p + 1e-9), y))
    assert "TL601" not in _codes(logged)


_LABELLED = torch.arange(0, 32, 2)  # the rows with a label (a node classifier's train_idx)


def _on_rows(how: str):  # noqa: ANN202
    """A cross-entropy on the labelled rows only, picked by an index or by a bool mask."""
    mask = torch.zeros(32, dtype=torch.bool)
    mask[_LABELLED] = True
    rows = _LABELLED if how == "index" else mask
    return lambda out, y: F.cross_entropy(out[rows], y[rows])


@pytest.mark.parametrize("how", ["index", "mask"])
def test_a_loss_on_the_labelled_rows_reads_the_output_through_the_index(how: str) -> None:
    probs = _monitored(nn.Sequential(_head(), nn.Softmax(dim=1)), _on_rows(how))
    assert "TL601" in _codes(probs)
    assert (probs.trace.loss_kind, probs.trace.num_classes) == ("cross_entropy", 10)
    assert "TL601" not in _codes(_monitored(_head(), _on_rows(how)))
    loud = _head()
    nn.init.normal_(loud[2].weight, std=4.0)
    assert "TL302" in _codes(_monitored(loud, _on_rows(how)))
    assert "TL302" not in _codes(_monitored(_head(), _on_rows(how)))
    model = nn.Sequential(_head(), nn.Softmax(dim=1))
    batch = (torch.randn(32, 6), torch.randint(0, 10, (32,)))
    assert "TL601" in _codes(trainlint.check(model, batch, loss_fn=_on_rows(how)))


def test_check_leaves_a_loss_on_the_logged_probabilities_alone() -> None:
    model = nn.Sequential(_head(), nn.Softmax(dim=1))
    batch = (torch.randn(16, 6), torch.randint(0, 10, (16,)))
    logged = trainlint.check(model, batch, loss_fn=lambda p, y: F.nll_loss(torch.log(p), y))
    assert "TL601" not in _codes(logged)
    assert "TL601" in _codes(trainlint.check(model, batch, loss_fn=F.nll_loss))


def test_a_monitor_from_the_first_step_finds_a_loss_far_above_ln_c() -> None:
    model = _head()
    nn.init.normal_(model[2].weight, std=4.0)
    loud = _monitored(model, nn.CrossEntropyLoss())
    assert "TL302" in _codes(loud)
    assert loud.trace.num_classes == 10
    assert "TL302" not in _codes(_monitored(_head(), nn.CrossEntropyLoss()))


class _OwnLoss(nn.Module):
    """Computes its loss in its forward, as transformers' models do with labels."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.head(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_check_knows_a_loss_the_model_computes_itself_by_its_graph() -> None:
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(32, 6, generator=g), "labels": torch.randint(0, 10, (32,),
                                                                          generator=g)}
    loud = _head()
    nn.init.normal_(loud[2].weight, std=4.0)
    report = trainlint.check(_OwnLoss(loud), batch)
    assert (report.trace.loss_kind, report.trace.num_classes) == ("cross_entropy", 10)
    assert "TL302" in _codes(report)
    assert "TL302" not in _codes(trainlint.check(_OwnLoss(_head()), batch))
    probs = trainlint.check(_OwnLoss(nn.Sequential(_head(), nn.Softmax(dim=1))), batch)
    assert "TL601" in _codes(probs)
    # The same through a loss_fn that returns the model's own loss.
    report = trainlint.check(_OwnLoss(loud), batch, loss_fn=lambda out, _: out["loss"])
    assert (report.trace.loss_kind, report.trace.num_classes) == ("cross_entropy", 10)
    assert "TL302" in _codes(report)


class _FeaturesThenProbabilities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.top = _head()[:2], nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> tuple:
        features = self.body(x)
        return features, self.top(features).softmax(dim=1)


def test_the_output_the_loss_reads_is_found_once_per_step_whoever_hands_the_loss() -> None:
    """An adapter hands the loss before the backward and step() gets it again after: the
    loss's output (the 2nd) is taken for the model's output once, not swapped back."""
    model = _FeaturesThenProbabilities()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(3):
            x, y = torch.randn(32, 6, generator=g), torch.randint(0, 10, (32,), generator=g)
            loss = F.cross_entropy(model(x)[1], y)
            monitor.read_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    assert "TL601" in _codes(report)
    assert report.trace.loss_reads_output is True


def test_a_monitor_created_after_training_began_does_not_judge_the_init() -> None:
    """Resumed from a checkpoint (the optimizer holds state): the Monitor's first step is
    not the run's first, so neither the first loss (TL302) nor the init (TL301) is judged."""
    def loud() -> nn.Module:
        model = _head()
        nn.init.normal_(model[2].weight, std=4.0)
        return model

    assert "TL302" in _codes(_monitored(loud(), nn.CrossEntropyLoss()))
    model = loud()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # state, weights as they are
    F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    report = _trained(model, opt, steps=3)
    assert report.trace.resumed
    assert not {"TL302", "TL301"} & _codes(report)
    assert "first training step" in report.skipped["TL301"]


def test_adagrad_state_made_at_construction_is_not_a_resume() -> None:
    """Adagrad fills its state (step 0, sum of squares at its initial value) when it is
    built: a fresh run with it is judged from its first step, as with SGD; one that has
    stepped is a resume."""
    model = _head()
    nn.init.normal_(model[2].weight, std=4.0)
    fresh = torch.optim.Adagrad(model.parameters(), lr=1e-5)
    assert fresh.state  # (what made it look resumed)
    report = _trained(model, fresh, steps=3)
    assert not report.trace.resumed
    assert "TL302" in _codes(report)
    stepped = torch.optim.Adagrad(model.parameters(), lr=1e-5)
    F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 10, (4,))).backward()
    stepped.step()
    assert _trained(model, stepped, steps=3).trace.resumed


def _graph_of(loss_fn, probabilities: bool = False, after_backward: bool = True,  # noqa: ANN001
              **model_kw) -> LossGraph:
    """The graph facts of ``loss_fn(output, y)`` on a 10-class head (its output softmaxed
    when ``probabilities``), read after the backward (before it: not ``after_backward``)."""
    model, y = _head(**model_kw), torch.randint(0, 10, (8,))
    out = model(torch.randn(8, 6))
    out = out.softmax(dim=1) if probabilities else out
    loss = loss_fn(out, y)
    if after_backward:
        _after_backward(loss)
    graph = read_loss_graph(loss, model.parameters(), _outputs(out))
    # A divisor held in a tensor is checked on its device; read as the step's copy does.
    return graph if graph.count_check is None else graph.resolve(bool(graph.count_check))


def test_terms_count_what_the_loss_adds_from_the_outputs() -> None:
    """A distillation KL on the outputs is a second term (the first loss is then no
    classifier's alone); label smoothing's term reads the cross-entropy's own log_softmax
    and a weight penalty reads no output: one term each."""
    teacher = torch.randn(8, 10) * 5

    def distilled(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kl = F.kl_div(F.log_softmax(o / 4, dim=1), F.softmax(teacher / 4, dim=1),
                      reduction="batchmean")
        return 0.9 * 16 * kl + 0.1 * F.cross_entropy(o, y)

    assert (_graph_of(distilled).kind, _graph_of(distilled).terms) == ("cross_entropy", 2)
    assert _graph_of(lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1)).terms == 1
    penalty = _head()
    assert _graph_of(lambda o, y: F.cross_entropy(o, y) + 1e-4 * sum(
        (p ** 2).sum() for p in penalty.parameters())).terms == 1
    mixed = _graph_of(lambda o, y: F.mse_loss(o, torch.zeros_like(o)) + F.cross_entropy(o, y))
    assert (mixed.kind, mixed.terms) == ("cross_entropy", 2)  # the classifier's, not the first


def test_classes_reduction_and_reading_through_casts_clamps_and_dim_minus_one() -> None:
    minus_one = _graph_of(lambda o, y: F.nll_loss(F.log_softmax(o, dim=-1), y))
    assert (minus_one.kind, minus_one.num_classes) == ("cross_entropy", 10)
    averaged = _graph_of(lambda o, y: F.cross_entropy(o, y, reduction="none").mean() / 4)
    assert averaged.reduction == "mean"
    weighted = _graph_of(lambda o, y: (F.cross_entropy(o, y, reduction="none") * y).sum())
    assert weighted.reduction == "none"
    cast = _graph_of(lambda o, y: F.cross_entropy(o.double(), y))
    assert (cast.num_classes, cast.reads_output) == (10, True)
    clamped = _graph_of(lambda o, y: F.cross_entropy(o.clamp(1e-7, 1.0), y), probabilities=True)
    assert clamped.reads_output is True


def test_a_loss_on_an_earlier_forward_of_the_step_is_found() -> None:
    """SAM and R-Drop run the model twice a step; the loss may read the first forward."""
    model, y = _head(), torch.randint(0, 10, (8,))
    first, second = model(torch.randn(8, 6)), model(torch.randn(8, 6))
    loss = _after_backward(F.cross_entropy(first, y) + 0 * second.sum())
    graph = read_loss_graph(loss, model.parameters(), _outputs(first) + _outputs(second))
    assert (graph.kind, graph.output_index, graph.output_count) == ("cross_entropy", 0, 1)


def test_check_and_the_monitor_leave_a_distilled_students_first_loss_alone() -> None:
    """A healthy student at default init learning from a confident teacher: its first loss
    is mostly the KL term, far above ln(10), and says nothing about its init."""
    teacher = nn.Linear(6, 10)
    nn.init.normal_(teacher.weight, std=3.0)

    def distilled(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(teacher(x_seen[0]) / 4, dim=1)
        kl = F.kl_div(F.log_softmax(o / 4, dim=1), soft, reduction="batchmean")
        return 0.9 * 16 * kl + 0.1 * F.cross_entropy(o, y)

    x_seen = [torch.randn(32, 6)]
    model = _head()
    limits, expected = RULES["TL302"].defaults, math.log(10)
    with torch.no_grad():  # as one classifier's first loss, it would be judged too high
        first = float(distilled(model(x_seen[0]), torch.zeros(32, dtype=torch.long)))
    assert first > limits["max_ratio"] * expected and first - expected > limits["min_excess"]
    report = trainlint.check(model, (x_seen[0], torch.randint(0, 10, (32,))), loss_fn=distilled)
    assert report.trace.loss_terms == 2 and "TL302" not in _codes(report)
    watched = _monitored(_head(), distilled)
    assert watched.trace.loss_terms == 2 and "TL302" not in _codes(watched)


# ------------------------------------------------------- a sum divided by the count of its items
def _sum_graph(divide, after_backward: bool = False) -> tuple:  # noqa: ANN001
    """The graph of ``divide(cross_entropy(reduction="sum"), targets)`` on a head whose first
    target is ignored (7 items of 8), read before its backward unless ``after_backward``."""
    model, y = _head(), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    y[0] = -100
    out = model(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)))
    loss = divide(F.cross_entropy(out, y, reduction="sum"), y)
    if after_backward:
        loss.backward()
    graph = read_loss_graph(loss, model.parameters(), _outputs(out))
    if graph.count_check is not None:  # cross_entropy's count is a tensor: checked on its
        assert graph.reduction == "sum" and not graph.counted  # device, read as the copy does
        graph = graph.resolve(bool(graph.count_check))
        assert graph.count_check is None
    return graph, loss, float(F.cross_entropy(out, y))


def test_a_sum_divided_by_the_count_of_its_items_is_a_mean() -> None:
    """transformers' models under Trainer: cross_entropy(reduction="sum") / num_items_in_batch
    (a tensor; the count of the whole accumulated batch under gradient accumulation). The
    divisor is read from the graph before the backward frees it; a divisor that is no count
    of the items (a temperature, a batch size below the count of its tokens) keeps it a sum."""
    for divide in (lambda s, y: s / y.ne(-100).sum(), lambda s, y: s / 7):
        graph, loss, mean = _sum_graph(divide)
        assert (graph.kind, graph.reduction, graph.counted) == ("cross_entropy", "mean", True)
        assert math.isclose(float(loss), mean, rel_tol=1e-5)
        assert math.isclose(float(item_mean(loss)), mean, rel_tol=1e-5)
    # Four micro-batches' count: the loss is a quarter of the mean; item_mean is the mean.
    graph, loss, mean = _sum_graph(lambda s, y: s / (4 * y.ne(-100).sum()))
    assert (graph.reduction, graph.counted) == ("mean", True)
    assert math.isclose(4 * float(loss), mean, rel_tol=1e-5)
    assert math.isclose(float(item_mean(loss)), mean, rel_tol=1e-5)
    for divide in (lambda s, y: s / 2.0, lambda s, y: s / 3, lambda s, y: s / 7.5):
        graph, loss, _ = _sum_graph(divide)
        assert (graph.reduction, graph.counted) == ("sum", False)
    graph, loss, _ = _sum_graph(lambda s, y: s / 7, after_backward=True)  # the 7 is freed
    assert graph.reduction == "sum"
    assert _sum_graph(lambda s, y: s)[0].reduction == "sum"
    assert item_mean(_sum_graph(lambda s, y: s / 2.0 + 0 * s)[1]) is None
    rows = _graph_of(lambda o, y: F.cross_entropy(o, y, reduction="none").sum() / len(y),
                     after_backward=False)
    assert rows.reduction == "mean"
    per_pair = _graph_of(lambda o, y: F.cross_entropy(o, y, reduction="none").sum() / 2,
                         after_backward=False)
    assert per_pair.reduction == "none"


class _SummedLoss(nn.Module):
    """Computes its loss as transformers' models do under Trainer: the sum of the tokens'
    cross-entropy over the number of items the caller counted (over ``accumulation`` batches
    like this one under gradient accumulation)."""

    def __init__(self, head: nn.Module, accumulation: int = 1) -> None:
        super().__init__()
        self.head, self.accumulation = head, accumulation

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.head(x)
        items = labels.ne(-100).sum() * self.accumulation
        return {"loss": F.cross_entropy(logits, labels, reduction="sum") / items,
                "logits": logits}


def test_a_monitor_and_check_judge_the_first_loss_of_a_sum_over_a_count() -> None:
    """TL302 judges a loss that sums its tokens' cross-entropy and divides by their count, in
    the Monitor (the model's own .loss, read in its forward; the step's per-item mean is
    recorded when the count covers accumulated batches) and in check (the loss_fn's)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 10, (32,), generator=g)
    loud = _head()
    nn.init.normal_(loud[2].weight, std=4.0)
    with torch.no_grad():
        first = float(F.cross_entropy(loud(x), y))
    for accumulation in (1, 4):
        model = _SummedLoss(copy.deepcopy(loud), accumulation)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with trainlint.Monitor(model, opt, every=1) as monitor:
            for _ in range(2):
                loss = model(x, y)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                monitor.step()
            report = monitor.report()
        assert report.trace.loss_reduction == "mean"
        assert math.isclose(report.trace.per_step[0]["loss"], first, rel_tol=1e-4)
        assert "TL302" in _codes(report)
    def summed(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(o, t, reduction="sum") / len(t)

    checked = trainlint.check(loud, (x, y), loss_fn=summed)
    assert checked.trace.loss_reduction == "mean" and "TL302" in _codes(checked)
    assert "TL302" not in _codes(trainlint.check(_head(), (x, y), loss_fn=summed))


def test_a_loss_that_adds_up_its_items_with_no_average_is_summed() -> None:
    """The pytorch/examples VAE's loss (a reduction="sum" BCE minus a constant times a full
    .sum()) is summed, after its backward too; a mean, a division, a sum over some dims then
    averaged, or a product of two terms anywhere is not."""
    torch.manual_seed(0)
    x = torch.rand(8, 12)
    recon = torch.sigmoid(torch.randn(8, 12, requires_grad=True))
    mu, logvar = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    vae = F.binary_cross_entropy(recon, x, reduction="sum") + kld
    assert summed_over_items(vae.grad_fn)
    vae.backward(retain_graph=True)
    assert summed_over_items(vae.grad_fn)
    assert summed_over_items(((recon - x) ** 2).sum().grad_fn)
    assert summed_over_items((F.mse_loss(recon, x, reduction="sum") - kld).grad_fn)
    assert not summed_over_items(F.binary_cross_entropy(recon, x).grad_fn)
    assert not summed_over_items((F.mse_loss(recon, x, reduction="sum") / 8).grad_fn)
    assert not summed_over_items((((recon - x) ** 2).sum(1)).mean().grad_fn)
    assert not summed_over_items((F.mse_loss(recon, x, reduction="sum") + F.mse_loss(recon, x)
                                  ).grad_fn)
    assert not summed_over_items((recon.sum() * mu.sum()).grad_fn)
    assert read_loss_graph(vae, []).summed and not read_loss_graph(kld / 8, []).summed


def test_a_term_shared_by_the_sums_is_read_once() -> None:
    """``s = s + s`` forty times: 2^40 paths through the graph, forty nodes."""
    s = torch.randn(4, requires_grad=True).sum()
    for _ in range(40):
        s = s + s
    assert summed_over_items(s.grad_fn)


def test_a_softmax_or_sigmoid_the_loss_function_applies_to_an_output_is_read() -> None:
    """TL601's bug made in the loss function: the squash between a model output and a loss
    that applies its own. A computation before it (a temperature), log-probabilities made
    from it, or a squash inside the model (TL601 reads that from the model) are not it."""
    two = torch.randint(0, 2, (8, 10)).float()
    assert _graph_of(lambda o, y: F.cross_entropy(o.softmax(-1), y)).squash == "softmax"
    assert _graph_of(lambda o, y: F.nll_loss(F.softmax(o, 1), y)).squash == "softmax"
    assert _graph_of(lambda o, y: F.binary_cross_entropy_with_logits(
        torch.sigmoid(o.view(8, 10)), two)).squash == "sigmoid"
    for healthy in (lambda o, y: F.cross_entropy(o, y),
                    lambda o, y: F.nll_loss(torch.log(F.softmax(o, 1)), y),
                    lambda o, y: F.cross_entropy((o / 2.0).softmax(-1), y),
                    lambda o, y: F.binary_cross_entropy(torch.sigmoid(o), two)):
        assert _graph_of(healthy).squash is None
    assert _graph_of(lambda o, y: F.cross_entropy(o, y), probabilities=True).squash is None


@pytest.mark.parametrize("backward", [False, True])
def test_bce_weighing_its_terms_is_known_before_and_after_the_backward(backward: bool) -> None:
    """pos_weight and weight are saved by BCE's node (freed by the backward: still told);
    cross-entropy's class weights are a weighted mean, which leaves ln(C) as it is."""
    model = _head(3)
    y = torch.rand(8, 3).round()
    for loss_fn, weighted in ((nn.BCEWithLogitsLoss(), False),
                              (nn.BCEWithLogitsLoss(pos_weight=torch.full((3,), 9.0)), True),
                              (nn.BCEWithLogitsLoss(weight=torch.full((8, 3), 2.0)), True),
                              (nn.CrossEntropyLoss(weight=torch.rand(3)), False)):
        hidden = model[:2](torch.randn(8, 6))
        logits = model[2](hidden)
        target = y.argmax(1) if isinstance(loss_fn, nn.CrossEntropyLoss) else y
        loss = loss_fn(logits, target)
        if backward:
            _after_backward(loss)
        assert read_loss_graph(loss, model.parameters(),
                               _outputs(hidden, logits)).weighted is weighted


def test_a_first_bce_loss_with_pos_weight_is_not_judged_against_ln2() -> None:
    """An uninformed classifier under pos_weight=20 with 10% positives starts near
    2.9 x ln(2): TL302 says why it does not judge it, in a check and in a Monitor."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 6, generator=g), (torch.rand(256, 1, generator=g) < 0.1).float()
    weighted = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([20.0]))
    report = trainlint.check(_head(1), (x, y), loss_fn=weighted)
    t = RULES["TL302"].defaults
    fired_at = max(t["max_ratio"] * math.log(2), math.log(2) + t["min_excess"])
    assert report.trace.losses[0] > fired_at  # what TL302 fired on before
    assert "TL302" not in _codes(report)
    assert any(n.startswith("TL302") and "pos_weight" in n for n in report.notes)
    opt = torch.optim.SGD((model := _head(1)).parameters(), lr=0.01)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(3):
            loss = weighted(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        assert "TL302" not in _codes(monitor.report())
        assert monitor.report().trace.loss_weighted


class ReturnsItsLoss(nn.Module):
    """``loss = model(x, y)``: the forward returns its own cross-entropy, a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _head()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def test_a_forward_that_returns_its_scalar_loss_is_trained_on_it_and_judged() -> None:
    g = torch.Generator().manual_seed(0)
    batch = ((torch.randn(32, 6, generator=g), torch.randint(0, 10, (32,), generator=g)), None)
    model = ReturnsItsLoss()
    report = trainlint.check(model, batch)
    assert "loss taken from the model's output (a scalar)" in report.notes
    assert report.trace.loss_kind == "cross_entropy" and report.trace.num_classes == 10
    assert report.trace.losses[0] == pytest.approx(model(*batch[0]).item(), rel=1e-6)
    nn.init.normal_(model.net[2].weight, std=4.0)
    assert "TL302" in _codes(trainlint.check(model, batch))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(3):
            loss = model(*batch[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()  # no loss passed: the model's own is read
        monitor_report = monitor.report()
    assert len(monitor_report.trace.losses) == 3 and "TL302" in _codes(monitor_report)


class ArcMargin(nn.Module):
    """ArcFace's loss on an embedding: cross-entropy of s * cos(theta + m) for the target,
    s * cos(theta) elsewhere, with the class centres its own parameter."""

    def __init__(self, dim: int = 10, classes: int = 50, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.s, self.m = s, m

    def forward(self, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.centres)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = F.one_hot(y, cos.shape[1]).bool()
        logits = self.s * torch.where(target, torch.cos(torch.acos(cos) + self.m), cos)
        return F.cross_entropy(logits, y)


def test_a_loss_on_values_its_function_computed_from_the_output_is_not_judged_at_init() -> None:
    """ArcFace starts ~30 nats above ln(C) by design: TL302 says why it does not judge it.
    A loss reading the output as it is, or a model's own loss on its inner logits, is judged
    as before (a cross-entropy the loss function computes nothing for)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 50, (64,), generator=g)
    margin = ArcMargin()
    hidden = (model := _head()).forward(x)
    graph = read_loss_graph(margin(hidden, y), model.parameters(), _outputs(hidden))
    assert graph.transforms_output and not graph.reads_output
    plain = read_loss_graph(F.cross_entropy(hidden, y % 10), model.parameters(),
                            _outputs(hidden))
    assert not plain.transforms_output and plain.reads_output
    report = trainlint.check(_head(), (x, y), loss_fn=margin,
                             optimizer=lambda p: torch.optim.SGD([*p, *margin.parameters()],
                                                                 lr=0.01))
    assert report.trace.losses[0] > math.log(50) + 10
    assert "TL302" not in _codes(report) and report.trace.loss_transforms_output
    assert any(n.startswith("TL302") and "ArcFace" in n for n in report.notes)


def test_the_items_a_loss_averages_are_samples_times_positions() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 10)
    logits = layer(torch.randn(4, 7, 6)).permute(0, 2, 1)  # (N, C, positions)
    graph = read_loss_graph(F.cross_entropy(logits, torch.randint(0, 10, (4, 7))),
                            layer.parameters(), _outputs(logits))
    assert (graph.kind, graph.items) == ("cross_entropy", 28)
    single = layer(torch.randn(6))  # unbatched (C,)
    assert read_loss_graph(F.cross_entropy(single, torch.tensor(3)), layer.parameters(),
                           _outputs(single)).items == 1
    multi = layer(torch.randn(4, 6))
    assert read_loss_graph(F.binary_cross_entropy_with_logits(multi, torch.rand(4, 10)),
                           layer.parameters(), _outputs(multi)).items == 40


def test_a_classifiers_first_loss_on_one_sample_is_not_judged_against_ln_c() -> None:
    """One sample's cross-entropy strays from ln(C) by chance (a healthy MLP at batch 1:
    5.8 against 2.3); a token model at batch 1 averages its positions, and is judged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 10))
    nn.init.normal_(model[2].weight, std=1.0)  # confident: far above ln(10) on any batch
    one = (torch.randn(1, 6), torch.tensor([3]))
    report = trainlint.check(model, one)
    assert report.trace.loss_items == 1 and "TL302" not in _codes(report)
    assert any(n.startswith("TL302") and "1 item(s)" in n for n in report.notes)
    assert "TL302" in _codes(trainlint.check(model, (torch.randn(16, 6),
                                                     torch.randint(0, 10, (16,)))))
    tokens = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))
    nn.init.normal_(tokens[1].weight, std=3.0)
    sequence = (torch.randint(0, 50, (1, 32)), torch.randint(0, 50, (1, 32)))
    report = trainlint.check(tokens, sequence)
    assert report.trace.loss_items == 32 and "TL302" in _codes(report)


def _soft(y: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Probability targets (label smoothing as mixup and cutmix also give them)."""
    return F.one_hot(y, 10).float() * (1 - smoothing) + smoothing / 10


@pytest.mark.parametrize("loss_fn, reduction", [
    (lambda o, y: F.cross_entropy(o, _soft(y)), "mean"),
    (lambda o, y: -(_soft(y) * F.log_softmax(o, dim=1)).sum(dim=1).mean(), "mean"),
    (lambda o, y: -(F.log_softmax(o, dim=-1) * _soft(y)).sum(), "sum"),
    (lambda o, y: F.cross_entropy(o, _soft(y), reduction="sum"), "sum"),
])
def test_cross_entropy_with_probability_targets_is_known(loss_fn, reduction) -> None:
    """Soft targets leave no NLL node, but a sum of the targets times a log_softmax of the
    output: a cross-entropy over 10 classes, read from the output as it is."""
    graph = _graph_of(loss_fn)
    assert (graph.kind, graph.num_classes, graph.reduction) == ("cross_entropy", 10, reduction)
    assert graph.reads_output and graph.squash is None
    squashed = _graph_of(lambda o, y: F.cross_entropy(o.softmax(dim=1), _soft(y)))
    assert squashed.kind == "cross_entropy" and squashed.squash == "softmax"
    assert _graph_of(loss_fn, probabilities=True).reads_output  # (a model ending in softmax)


def test_other_products_with_a_log_softmax_are_no_cross_entropy() -> None:
    """A policy gradient's picked log-probabilities times advantages, and an entropy bonus
    (probabilities that depend on the output times their logs) are not read as one."""
    advantages = torch.randn(8, 1)

    def policy(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(advantages * F.log_softmax(o, dim=1).gather(1, y[:, None])).sum()

    def entropy(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (o.softmax(dim=1) * F.log_softmax(o, dim=1)).sum()

    assert _graph_of(policy).kind is None
    assert _graph_of(entropy).kind is None


def test_a_monitor_reads_mixup_targets_for_tl601_not_for_tl302() -> None:
    """A model that ends in softmax, trained with mixup's probability targets: TL601. The
    first loss is not judged against ln(C) (TL302): a policy gradient's one-hot weights
    times its returns make the same graph, and its level is the returns'."""
    torch.manual_seed(0)
    ends_in_softmax = nn.Sequential(_head(), nn.Softmax(dim=1))
    assert "TL601" in _codes(_monitored(ends_in_softmax, lambda o, y: F.cross_entropy(o, _soft(y))))
    loud = _head()
    nn.init.normal_(loud[2].bias, std=8.0)
    report = _monitored(loud, lambda o, y: F.cross_entropy(o, _soft(y, 0.3)))
    assert report.trace.loss_kind == "cross_entropy" and report.trace.loss_soft_targets
    assert "policy gradient" in report.skipped["TL302"]
    assert not {"TL601", "TL302"} & _codes(
        _monitored(_head(), lambda o, y: F.cross_entropy(o, _soft(y, 0.3))))


def test_a_policy_gradient_on_one_hot_actions_is_no_loss_at_ln_c() -> None:
    """REINFORCE written as -(one_hot(a) * returns * log_softmax(logits)).sum(-1).mean(),
    with returns near 100: its first value (~28 here) is no classifier's loss (measured: the
    policy learns); TL302 stays out."""
    torch.manual_seed(0)
    returns = 100 + torch.randn(32, 1)

    def reinforce(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights = F.one_hot(y, 10).float() * returns
        return -(weights * F.log_softmax(o, dim=-1)).sum(-1).mean() / 10

    report = _monitored(_head(), reinforce)
    assert "TL302" not in _codes(report)


def test_soft_targets_over_a_language_models_vocabulary_count_its_classes() -> None:
    """Label-smoothed cross-entropy written by hand over (N, T, V) logits: V classes (the
    log_softmax's dim), N x T items; not T."""
    logits = torch.randn(4, 12, 50, requires_grad=True)
    targets = torch.full((4, 12, 50), 0.1 / 50)
    out = logits * 1.0  # (the model's output)
    loss = -(targets * F.log_softmax(out, dim=-1)).sum(-1).mean()
    graph = read_loss_graph(loss, [], [output_nodes([out])])
    assert (graph.kind, graph.num_classes, graph.items) == ("cross_entropy", 50, 48)
