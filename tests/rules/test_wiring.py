"""TL505, TL506, TL601, TL602 (how the step is wired) on hand-built traces."""

from __future__ import annotations

import pytest
from trainlint.rules import wiring
from trainlint.rules.wiring import CHANGE, MOVED_STEPS

from tests.rules.tracekit import hits, module, param, point, trace
from trainlint.engine import Skip


def _params(**overrides):
    """body.0 / body.1 / head / aux parameters; ``overrides`` maps a name to param kwargs."""
    names = ["body.0.weight", "body.0.bias", "body.1.weight", "head.weight", "head.bias",
             "aux.weight", "aux.bias"]
    return [param(n, (4, 4) if n.endswith("weight") else (4,), **overrides.get(n, {}))
            for n in names]


def test_tl505_groups_an_unused_submodule():
    unused = {"grad_steps": 0, "grad_norm": None}
    t = trace([], params=_params(**{"aux.weight": unused, "aux.bias": unused}),
              observed_steps=3)
    found = hits("TL505", t)
    assert [h.module for h in found] == ["aux"]
    assert found[0].evidence["params"] == ["aux.bias", "aux.weight"]
    assert "find_unused_parameters" in found[0].fix


def test_tl505_a_single_parameter_is_named_at_its_module():
    t = trace([], params=_params(**{"head.bias": {"grad_steps": 0}}), observed_steps=2)
    found = hits("TL505", t)
    assert [(h.module, h.evidence["params"]) for h in found] == [("head", ["head.bias"])]


def test_tl505_a_parameter_of_the_model_itself_is_named_in_the_fix():
    t = trace([], params=_params() + [param("gate", (4,), grad_steps=0)], observed_steps=2)
    found = hits("TL505", t)
    assert [h.module for h in found] == [""]
    assert found[0].fix.startswith("use 'gate' in forward")


@pytest.mark.parametrize("mode", ["check", "monitor"])
def test_tl505_no_gradient_anywhere(mode):
    """A loss on ``outputs.detach().requires_grad_()``: differentiable, yet no parameter gets
    a gradient (every .grad None, weights unchanged, accuracy at chance: measured). A check
    ran the backward itself: reported. A Monitor may be stepped after zero_grad(): a note."""
    none = {p.name: {"grad_steps": 0, "grad_norm": None} for p in _params()}
    t = trace([], params=_params(**none), observed_steps=3, mode=mode)
    if mode == "monitor":
        with pytest.raises(Skip, match="call monitor.step"):
            hits("TL505", t)
        return
    [found] = hits("TL505", t)
    assert found.module == "" and "none of the model's 7 trainable parameters" in found.message
    assert ".detach()" in found.fix
    # An optimizer fused into the backward (register_post_accumulate_grad_hook steps each
    # parameter and drops its .grad): the layers' gradients show the backward reached them.
    t.layers = [point("body.0", "Linear", grad_norm=0.134)]
    with pytest.raises(Skip, match="no parameter kept its .grad"):
        hits("TL505", t)


def test_tl505_frozen_or_used_at_some_step_is_fine():
    frozen = {"grad_steps": 0, "requires_grad": False}
    t = trace([], params=_params(**{"aux.weight": frozen, "aux.bias": frozen}), observed_steps=3)
    assert hits("TL505", t) == []
    t = trace([], params=_params(**{"aux.weight": {"grad_steps": 1}}), observed_steps=3)
    assert hits("TL505", t) == []


@pytest.mark.parametrize("observed, norms, fires", [
    ([0, 10, 20], [0.50, 0.52, 0.55], False),  # trained at the steps in between
    ([0, 10, 20], [0.5, 0.5, 0.5], True),  # observed every 10th step, never moved
    ([0, 10, 20], [0.5, 0.5, 0.5 * (1 + 2 * CHANGE)], False),  # just above the change bound
    ([0, 10, 20], [0.5, 0.5, 0.5 * (1 + 0.5 * CHANGE)], True),  # below it: the same values
    ([0, 1, 2], [0.50, 0.52, 0.55], True),  # every step observed: changed by something else
    ([0, 10], [0.5], True),  # one update seen: nothing to compare
])
def test_tl505_a_parameter_trained_between_observed_steps_is_not_unused(observed, norms,
                                                                         fires):
    """Round-robin multi-task training observed every 10th step: one head gets its gradient
    at odd steps only, so no observed step gives it one, yet its values move."""
    params = _params(**{"aux.weight": {"grad_steps": 0, "grad_norm": None}})
    aux = next(p for p in params if p.name == "aux.weight")
    aux.norms_before = list(norms)
    t = trace([], params=params, observed_steps=len(observed),
              per_step=[{"step": s, "layers": {}} for s in observed])
    assert [h.module for h in hits("TL505", t)] == (["aux"] if fires else [])


def test_tl505_a_submodule_run_without_autograd_is_told_so():
    """Its outputs were observed with autograd off inside the training forward (a reentrant
    checkpoint on inputs that need no gradient): the fix turns autograd on, not 'use it'."""
    unused = {"grad_steps": 0, "grad_norm": None}
    params = _params(**{"aux.weight": unused, "aux.bias": unused})
    quiet = hits("TL505", trace([], params=params, observed_steps=3, gradless=["body.0"]))
    assert "do not take part in the loss" in quiet[0].message
    [found] = hits("TL505", trace([], params=params, observed_steps=3, gradless=["aux"]))
    assert found.module == "aux" and found.evidence["ran_without_autograd"]
    assert "ran with autograd off inside the training forward" in found.message
    assert "use_reentrant=False" in found.fix


def _library(name: str, type_: str, base: str = "", package: str = "transformers"):
    facts = module(name, type_, leaf=False)
    facts.library, facts.base = package, base or type_
    return facts


UNUSED = {"grad_steps": 0, "grad_norm": None}


def test_tl505_what_a_librarys_forward_leaves_out_is_info():
    """A transformers model's pooler that its masked-LM head does not call, and a mask token
    only pretraining reads, while the model's other parameters train: info, naming the
    library class; the same parts of the user's own classes stay warnings."""
    params = [param(n, (4,)) for n in ("enc.layer.weight", "emb.word.weight", "head.weight")]
    params += [param(n, (4,), **UNUSED) for n in ("enc.pooler.dense.weight",
                                                  "enc.pooler.dense.bias", "emb.mask_token")]
    library = [_library("enc", "BigBirdModel"), _library("emb", "Dinov2Embeddings"),
               _library("enc.pooler", "BigBirdPooler")]
    found = {h.module: h for h in hits("TL505", trace([], modules=library, params=params,
                                                      observed_steps=2))}
    assert set(found) == {"enc.pooler", "emb"}
    assert all(h.severity == "info" for h in found.values())
    assert found["enc.pooler"].evidence["owner"] == "enc"
    assert "the transformers class BigBirdModel builds them and its forward does not use " \
        "them here" in found["enc.pooler"].message
    ran = trace([point("enc.pooler.dense", "Linear")], modules=library, params=params,
                observed_steps=2)  # (CLIP's post_layernorm runs; its classifier pools another)
    [pooler] = [h for h in hits("TL505", ran) if h.module == "enc.pooler"]
    assert "they run, but the loss does not depend on their output here (the head reads" \
        in pooler.message
    assert "add_pooling_layer=False" in pooler.fix
    assert found["emb"].evidence["params"] == ["emb.mask_token"]
    assert "find_unused_parameters" in found["emb"].fix
    assert "add_pooling_layer" not in found["emb"].fix  # no pooler there
    own = [module("enc", "MyEncoder", leaf=False), module("emb", "MyEmbeddings", leaf=False)]
    installed = [_library("enc", "MyEncoder", package="acme_models"),
                 _library("emb", "MyEmbeddings", package="acme_models")]  # the user's package
    for modules in (own, installed):
        found = hits("TL505", trace([], modules=modules, params=params, observed_steps=2))
        assert sorted(h.module for h in found) == ["emb", "enc.pooler"]
        assert all(h.severity is None for h in found)


def test_tl505_names_the_library_model_whose_head_reads_another_output():
    """CLIPForImageClassification over the CLIPVisionModel that builds post_layernorm: the
    layer runs, the model in use is the one whose head reads another output, and
    add_pooling_layer (a BERT-family option) is not offered for a layer that is no pooler."""
    params = [param(n, (4,)) for n in ("vision.encoder.weight", "classifier.weight")]
    params += [param(n, (4,), **UNUSED) for n in ("vision.post_layernorm.weight",
                                                  "vision.post_layernorm.bias")]
    modules = [_library("", "CLIPForImageClassification"), _library("vision", "CLIPVisionModel")]
    ran = trace([point("vision.post_layernorm", "LayerNorm")], modules=modules, params=params,
                observed_steps=2)
    [found] = hits("TL505", ran)
    assert found.severity == "info" and found.module == "vision.post_layernorm"
    assert "the transformers class CLIPVisionModel builds them" in found.message
    assert "(the head of CLIPForImageClassification reads another output)" in found.message
    assert "add_pooling_layer" not in found.fix


def test_tl505_a_librarys_unused_part_stays_a_warning_when_user_code_owns_it():
    """A torch ModuleList whose last block the user's loop skips (the loop is the user's), and
    a library backbone that trains nothing at all (cut off by a .detach()): warnings."""
    blocks = [param(f"blocks.{i}.weight", (4,), **(UNUSED if i == 3 else {})) for i in range(4)]
    containers = [_library("blocks", "ModuleList", package="torch")]
    found = hits("TL505", trace([], modules=containers, params=blocks + [param("head.w", (4,))],
                                observed_steps=2))
    assert [(h.module, h.severity) for h in found] == [("blocks.3", None)]
    backbone = [param(n, (4,), **UNUSED) for n in ("bert.layer.weight", "bert.pooler.weight")]
    found = hits("TL505", trace([], modules=[_library("bert", "BertModel")],
                                params=backbone + [param("head.weight", (4,))], observed_steps=2))
    assert [(h.module, h.severity) for h in found] == [("bert", None)]


@pytest.mark.parametrize("rootless", [False, True])
@pytest.mark.parametrize("ran", [False, True])
def test_tl505_a_library_models_backbone_cut_off_by_the_training_step_is_a_warning(rootless,
                                                                                 ran):
    """BertForSequenceClassification whose training step calls model.bert(...) and detaches
    its output before model.classifier: the model's own forward never ran and the backbone
    did, so the wiring that leaves it out is the user's (it was told 'the library builds them,
    nothing to change'; accuracy 0.328 against 0.785). A part the step never calls (SimCSE
    trains BertForMaskedLM's encoder alone; its MLM head idles) stays info."""
    modules = [_library("", "BertForSequenceClassification"), _library("bert", "BertModel")]
    params = [param(n, (4,), **UNUSED) for n in ("bert.layer.weight", "bert.pooler.weight")]
    params += [param("classifier.weight", (4,))]
    layers = [point("bert.layer", "Linear")] if ran else []
    found = hits("TL505", trace(layers, modules=modules, params=params, observed_steps=2,
                                rootless=rootless))
    assert [(h.module, h.severity) for h in found] == [
        ("bert", None if rootless and ran else "info")]


def _experts(rows: dict, container: str = "ModuleList", steps: int = 3) -> tuple:
    """Four Expert members of ``experts`` (a ``container``), expert ``i`` observed with
    ``rows[i]`` rows (absent: never called, no gradient) at each of ``steps``, and a trained
    head."""
    layers = [point(f"experts.{i}.fc", "Linear", depth=i, shape=(n, 16))
              for i, n in sorted(rows.items())]
    modules = [module("experts", container, leaf=False)]
    modules += [module(f"experts.{i}", "Expert", leaf=False) for i in range(4)]
    modules += [module(f"experts.{i}.fc", "Linear") for i in range(4)]
    params = [param(f"experts.{i}.fc.weight", (16, 8),
                    **({"grad_steps": steps} if i in rows else UNUSED))
              for i in range(4)] + [param("head.weight", (3, 16), grad_steps=steps)]
    return layers, modules, params


def test_tl505_experts_no_token_was_routed_to_are_not_unused():
    """A mixture of experts: the experts that ran took 5 and 2 rows (tokens routed to each);
    experts 2 and 3 were sent none, so they were never called. Not a wiring fault."""
    layers, modules, params = _experts({0: 5, 1: 2})
    t = trace(layers, modules=modules, params=params, observed_steps=3)
    assert hits("TL505", t) == []


def test_tl505_a_member_a_loop_skips_is_unused():
    """The members that ran took the same rows (a loop over all but the last block): the one
    never called is reported."""
    layers, modules, params = _experts({0: 8, 1: 8, 2: 8})
    found = hits("TL505", trace(layers, modules=modules, params=params, observed_steps=3))
    assert [h.module for h in found] == ["experts.3"]


def test_tl505_only_a_modulelists_or_moduledicts_members_are_experts():
    """Children that took different rows but are a Sequential's stages (or plain attributes)
    are no experts: the ones never called are reported."""
    layers, modules, params = _experts({0: 8, 1: 5}, container="Sequential")
    found = hits("TL505", trace(layers, modules=modules, params=params, observed_steps=3))
    assert [h.module for h in found] == ["experts.2", "experts.3"]
    layers, modules, params = _experts({0: 8, 1: 5}, container="ModuleDict")
    assert hits("TL505", trace(layers, modules=modules, params=params, observed_steps=3)) == []


def _dropped(steps: list, n: int) -> list:
    """TL505's findings on four Block members of ``blocks`` whose parameters got a gradient
    at ``steps[i]`` of ``n`` observed steps, with a head trained at each."""
    modules = [module("blocks", "ModuleList", leaf=False)]
    modules += [module(f"blocks.{i}", "Block", leaf=False) for i in range(len(steps))]
    params = [param(f"blocks.{i}.fc.weight", (8, 8), grad_steps=k, grad_norm=1.0 if k else None)
              for i, k in enumerate(steps)] + [param("head.weight", (3, 8), grad_steps=n)]
    return hits("TL505", trace([], modules=modules, params=params, observed_steps=n))


@pytest.mark.parametrize("share, reported", [(0.99, True), (1.01, False)])
def test_tl505_a_block_skipped_at_random_is_not_unused_where_that_may_be_chance(
        monkeypatch, share, reported):
    """LayerDrop (a residual block skipped whole with p = 0.5 per batch): a 3-step check
    found block 0 run at no step and reported it unused (the model trained: loss 1.92 ->
    0.45, held-out better than without the drop). Its siblings ran at 2, 1 and 2 of 3 steps,
    a skip rate of 4/9: some member of four goes without at all 3 with a chance of 1 - (1 -
    (4/9)^3)^4. Reported only where that chance is below ``SKIP_CHANCE``."""
    chance = 1 - (1 - (4 / 9) ** 3) ** 4
    monkeypatch.setattr(wiring, "SKIP_CHANCE", chance / share)
    assert [h.module for h in _dropped([0, 2, 1, 2], 3)] == (["blocks.0"] if reported else [])


def test_tl505_a_block_never_run_in_a_run_observed_every_nth_step_is_unused():
    """A ModuleDict of task heads, one of which a buggy sampler never picks, at every=5: its
    siblings ran at some observed steps and not others, which read as chance, and it went
    unreported (measured: its weights bit-identical after 1000 steps, accuracy at chance).
    With steps between observations a block skipped at random changed between them (not
    reported, see changed_between); this one did not."""
    found = _dropped([0, 2, 1, 2], 3)
    assert found == []  # observed at every step: may be chance
    modules = [module("heads", "ModuleDict", leaf=False)]
    modules += [module(f"heads.{i}", "Head", leaf=False) for i in range(4)]
    params = [param(f"heads.{i}.fc.weight", (8, 8), grad_steps=k, grad_norm=1.0 if k else None,
                    ratios=(1e-3,) * 3) for i, k in enumerate([0, 2, 1, 2])]
    per_step = [{"step": 5 * i, "layers": {}} for i in range(3)]
    t = trace([], modules=modules, params=params, observed_steps=3, per_step=per_step)
    assert [h.module for h in hits("TL505", t)] == ["heads.0"]


def test_tl505_a_block_never_run_among_siblings_run_at_every_step_is_unused():
    """Siblings that ran at every observed step: nothing skips at random, and the block the
    loop never reaches is reported, as is one never run among blocks dropped at random over
    enough steps (rate 0.1 over 10: a chance of 4e-10)."""
    assert [h.module for h in _dropped([0, 3, 3, 3], 3)] == ["blocks.0"]
    assert [h.module for h in _dropped([0, 9, 9, 9], 10)] == ["blocks.0"]


def test_tl506_missing_params_grouped_by_module():
    missing = {"in_optimizer": False}
    t = trace([], params=_params(**{"head.weight": missing, "head.bias": missing}))
    found = hits("TL506", t)
    assert [h.module for h in found] == ["head"]
    assert "model.head.parameters()" in found[0].fix


def test_tl506_numeric_module_names_get_valid_python():
    t = trace([], params=_params(**{"body.1.weight": {"in_optimizer": False}}))
    found = hits("TL506", t)
    assert found[0].module == "body.1"
    assert "model.get_submodule('body.1').parameters()" in found[0].fix


def test_tl506_partly_missing_module_lists_just_the_missing_params():
    missing = {"in_optimizer": False}
    t = trace([], params=_params(**{"body.0.bias": missing, "head.bias": missing}))
    found = hits("TL506", t)
    assert [h.module for h in found] == ["body.0", "head"]
    assert "{'params': [model.get_parameter('body.0.bias')]}" in found[0].fix
    assert "{'params': [model.get_parameter('head.bias')]}" in found[1].fix
    own = trace([], params=_params() + [param("gate", (4,), in_optimizer=False)])
    assert "{'params': [model.get_parameter('gate')]}" in hits("TL506", own)[0].fix


def test_tl506_frozen_params_and_unknown_optimizer():
    frozen = {"in_optimizer": False, "requires_grad": False}
    assert hits("TL506", trace([], params=_params(**{"aux.weight": frozen}))) == []
    unknown = {n.name: {"in_optimizer": None} for n in _params()}
    with pytest.raises(Skip):
        hits("TL506", trace([], params=_params(**unknown)))


@pytest.mark.parametrize("verdicts, fires", [
    ([True], True), ([True, True, False], True), ([True, False], False),
    ([False, None, False], False), ([None, None], False)])
def test_tl506_gradients_cleared_before_the_step(verdicts, fires):
    """A Monitor's verdicts (``grads_cleared``, absent where a step was not judged): the
    gradients backward made were cleared before optimizer.step() at more than half of the
    observed steps judged."""
    per_step = [{"step": 5 * i, "layers": {}} for i in range(len(verdicts))]
    for s, v in zip(per_step, verdicts):
        if v is not None:
            s["grads_cleared"] = v
    params = _params()
    for p in params:
        p.update_norms = [0.0] * len(verdicts)
    found = hits("TL506", trace([], params=params, per_step=per_step,
                                observed_steps=len(verdicts)))
    assert len(found) == int(fires)
    if fires:
        assert found[0].evidence["cleared_steps"][0] == 0
        assert found[0].evidence["unchanged_params"] == len(params)
        assert "zero_grad() is called between loss.backward() and optimizer.step()" in \
            found[0].message


@pytest.mark.parametrize("moved, fires", [(2.0, False), (0.5, True), (0.0, True)])
def test_tl505_tl506_a_moving_average_target_is_updated_elsewhere(moved, fires):
    """A BYOL target left with requires_grad=True, run under no_grad and updated as a moving
    average of the online network: in no optimizer, no gradient, yet its values change from
    the first observed step to the last (by ``moved`` x the change bound)."""
    target = {"in_optimizer": False, "grad_steps": 0, "grad_norm": None}
    params = _params() + [param("target.weight", (4, 4), **target),
                          param("target.bias", (4,), **target)]
    for p in params[-2:]:
        p.first_norm, p.norm = 3.0, 3.0 * (1 + moved * CHANGE)
    t = trace([], params=params, observed_steps=10,
              per_step=[{"step": s, "layers": {}} for s in range(10)])
    assert [h.module for h in hits("TL505", t)] == (["target"] if fires else [])
    assert hits("TL506", t) == []  # no gradient: an optimizer would not move it either


@pytest.mark.parametrize("checks, moved, fires", [
    (1, 1, False), (1, 0, True), (5, MOVED_STEPS, False), (5, MOVED_STEPS - 1, True),
    (0, 0, True)])
def test_tl505_tl506_a_target_seen_moving_within_observed_steps(checks, moved, fires):
    """The first and last norms agree (one observed step, or a change undone), but the probe
    saw the values change outside the forward within observed steps: at the only one, or at
    ``MOVED_STEPS`` or more (a WGAN-style clip of every weight in the loop changes a forgotten
    layer once: still reported)."""
    target = {"in_optimizer": False, "grad_steps": 0, "grad_norm": None}
    params = _params() + [param("target.weight", (4, 4), **target)]
    params[-1].first_norm = params[-1].norm = 3.0
    params[-1].outside_checks, params[-1].moved_outside = checks, moved
    t = trace([], params=params, observed_steps=max(checks, 1))
    assert [h.module for h in hits("TL505", t)] == (["target"] if fires else [])
    assert hits("TL506", t) == []  # no gradient: an optimizer would not move it either


@pytest.mark.parametrize("grad_steps, others, fires", [
    (0, 3, False),  # no gradient while others got one: TL505's, an optimizer would not move it
    (1, 3, True),  # a gradient at one observed step: never applied
    (0, 0, True),  # no parameter got a gradient: nothing tells it from the others
])
def test_tl506_judges_parameters_that_get_a_gradient(grad_steps, others, fires):
    """A linear probe's backbone run under torch.no_grad() with requires_grad left on, the
    optimizer over the head only: TL506 said error, yet an optimizer over model.parameters()
    left the backbone bit-identical (no .grad; loss 3.11 -> 0.062 either way, measured)."""
    backbone = {"in_optimizer": False, "grad_steps": grad_steps, "grad_norm": None}
    params = _params(**{n: {"grad_steps": others} for n in ("head.weight", "head.bias")})
    params = [p for p in params if not p.name.startswith(("body", "aux"))]
    params += [param("body.0.weight", (4, 4), **backbone), param("body.0.bias", (4,), **backbone)]
    t = trace([], params=params, observed_steps=3)
    assert [h.module for h in hits("TL506", t)] == (["body"] if fires else [])
    if others:  # (none got one: TL505 says the loss does not reach the model)
        assert [h.module for h in hits("TL505", t)] == (["body"] if grad_steps == 0 else [])


def test_tl506_a_parameter_the_optimizer_steps_is_judged_by_its_updates():
    """A parameter with recorded optimizer updates is no moving-average copy, whatever its
    first and last norms."""
    p = param("head.weight", (4, 4), in_optimizer=False, ratios=(1e-3,))
    p.first_norm, p.norm = 1.0, 2.0
    assert [h.module for h in hits("TL506", trace([], params=_params() + [p]))] == ["head"]


def _ending_in(kind: str, loss: str, shape=(8, 10), classes=10, via=()):
    last = point("out", kind.capitalize(), op="output", kind=kind, shape=shape)
    return trace([last], output_ops=((last.node, via),), loss_kind=loss, num_classes=classes)


@pytest.mark.parametrize("kind, loss, severity", [
    ("softmax", "cross_entropy", None),
    ("softmax", "nll", None),
    ("sigmoid", "bce_with_logits", None),
    ("log_softmax", "cross_entropy", None),
])
def test_tl601_fires_for_double_application(kind, loss, severity):
    found = hits("TL601", _ending_in(kind, loss, classes=10 if loss != "bce_with_logits"
                                      else None))
    assert [h.module for h in found] == ["out"]
    assert found[0].severity == severity
    # NLLLoss needs log-probabilities: raw logits into it fall without bound (measured:
    # -0.13 -> -89, accuracy 0.131; log_softmax + NLLLoss reached 0.774).
    assert ("use log_softmax instead of softmax" in found[0].fix) is (loss == "nll")
    assert ("pass the raw logits to the loss" in found[0].fix) is (loss != "nll")


@pytest.mark.parametrize("kind, loss", [("log_softmax", "nll"), ("softmax", "mse"),
                                        ("sigmoid", "custom"), ("relu", "cross_entropy")])
def test_tl601_correct_pairs_are_fine(kind, loss):
    assert hits("TL601", _ending_in(kind, loss)) == []


def test_tl601_clamped_probabilities_are_still_probabilities():
    for via in (("clamp",), ("clip", "view"), ("clamp_min",)):
        assert [h.module for h in hits("TL601", _ending_in("softmax", "cross_entropy",
                                                            via=via))] == ["out"], via


def test_tl601_only_the_class_scores_count():
    attention_map = _ending_in("softmax", "cross_entropy", shape=(8, 4, 16, 16), classes=10)
    assert hits("TL601", attention_map) == []
    through_arithmetic = _ending_in("softmax", "cross_entropy", via=("mul",))
    assert hits("TL601", through_arithmetic) == []


@pytest.mark.parametrize("squash, loss, fires", [
    ("softmax", "cross_entropy", True), ("softmax", "nll", True),
    ("sigmoid", "bce_with_logits", True), ("sigmoid", "cross_entropy", False),
    (None, "cross_entropy", False),
])
def test_tl601_fires_when_the_loss_function_squashes_the_logits(squash, loss, fires):
    """The model returns logits; the loss function's softmax/sigmoid before a loss that
    applies its own (the loss graph's ``squash``) is the same bug. Reported on the head."""
    t = _ending_in("relu", loss)
    t.loss_squash = squash
    t.loss_reads_output = False  # the loss reads the squash, not the output as it is
    found = hits("TL601", t)
    assert [h.module for h in found] == (["out"] if fires else [])
    if fires:
        assert found[0].severity is None and squash in found[0].message
        assert ("use log_softmax instead" in found[0].fix) is (loss == "nll")


def test_tl601_unknown_loss_is_a_note():
    with pytest.raises(Skip):
        hits("TL601", _ending_in("softmax", None))


def _flags(model_training=True, eval_modules=(), n=4):
    return [{"step": 10 * i, "model_training": model_training,
             "eval_modules": list(eval_modules)} for i in range(n)]


def _mode_model(flags, **bn_param):
    facts = [module("backbone", "Backbone", leaf=False), module("backbone.bn", "BatchNorm2d"),
             module("head.drop", "Dropout")]
    params = [param("backbone.bn.weight", (4,), **bn_param)]
    return trace([], modules=facts, params=params, train_flags=flags, mode="monitor")


def test_tl602_model_in_eval_mode_fires():
    found = hits("TL602", _mode_model(_flags(model_training=False)))
    assert [h.module for h in found] == [""]
    assert found[0].evidence["eval_steps"] == 4


def test_tl602_submodule_in_eval_while_training_fires():
    found = hits("TL602", _mode_model(_flags(eval_modules=["backbone.bn"])))
    assert [h.module for h in found] == ["backbone"]


@pytest.mark.parametrize("layer, fires", [
    (module("enc.att", "MultiheadAttention", dropout=0.1), True),
    (module("enc.att", "MultiheadAttention", dropout=0.0), False),
    (module("enc.rnn", "LSTM", dropout=0.3, num_layers=2), True),
    (module("enc.rnn", "GRU", dropout=0.3, num_layers=1), False),  # no layer to drop between
])
def test_tl602_layers_with_a_dropout_inside(layer, fires):
    facts = [module("enc", "Encoder", leaf=False), layer]
    in_eval = trace([], modules=facts, train_flags=_flags(model_training=False), mode="monitor")
    sub_eval = trace([], modules=facts, train_flags=_flags(eval_modules=[layer.name]),
                     mode="monitor")
    assert bool(hits("TL602", in_eval)) is fires
    assert [h.module for h in hits("TL602", sub_eval)] == (["enc"] if fires else [])


def test_tl602_names_the_submodules_when_all_are_in_eval():
    alone = trace([], modules=[module("1", "BatchNorm1d")], train_flags=_flags(eval_modules=["1"]),
                  mode="monitor")
    found = hits("TL602", alone)
    assert [h.module for h in found] == ["1"]
    assert "the model itself" not in found[0].message and "'1'" in found[0].fix
    every = _mode_model(_flags(eval_modules=["backbone.bn", "head.drop"]))
    assert [h.module for h in hits("TL602", every)] == ["backbone", "head"]


def test_tl602_frozen_on_purpose_is_fine():
    frozen = _mode_model(_flags(eval_modules=["backbone.bn"]), requires_grad=False)
    assert hits("TL602", frozen) == []
    overridden = _mode_model(_flags(eval_modules=["backbone.bn"]))
    overridden.modules["backbone"].attrs["overrides_train"] = True
    assert hits("TL602", overridden) == []


def test_tl602_in_a_check_reads_only_the_modes_the_users_code_set():
    """A check puts the model in train mode itself: eval at its training forward was set by
    the user's code (a forward calling self.eval()); otherwise the rule says it could not
    tell what the user's loop does."""
    t = _mode_model(_flags(model_training=False))
    t.mode = "check"
    assert hits("TL602", t)
    t = _mode_model(_flags())
    t.mode = "check"
    with pytest.raises(Skip):
        hits("TL602", t)


def test_tl602_training_mode_throughout_is_fine():
    assert hits("TL602", _mode_model(_flags())) == []


def test_the_library_of_a_module_class_is_where_its_source_lives():
    """torch's and transformers' classes are library ones; a class of the user's own file (this
    test module) or one without a source file is the user's."""
    import torch.nn as nn
    from transformers.models.bert.modeling_bert import BertPooler

    from trainlint.origins import library_of

    class Mine(nn.Module):
        pass

    assert library_of(nn.Linear) == "torch" and library_of(nn.ModuleList) == "torch"
    assert library_of(BertPooler) == "transformers"
    assert library_of(Mine) == "" and library_of(type("Made", (nn.Module,), {})) == ""


def _lora(steps: int, lr: float, bias_trains: bool = False):  # noqa: ANN202
    """A module 'q' with a frozen base and factors A, B at 0 whose gradients were 0 at every
    one of ``steps`` steps (and, ``bias_trains``, a second module whose weight trains beside
    a zero bias with a zero gradient: a ReZero branch behind its alpha)."""
    from trainlint.trace import ParamTrace, RunTrace

    def zero(name: str) -> ParamTrace:
        return ParamTrace(name, name.rpartition(".")[0], (4, 4), True, True, norm=0.0, std=0.0,
                          grad_norm=0.0, grad_steps=steps, lr=lr, first_norm=0.0)

    params = [ParamTrace("q.base.weight", "q.base", (4, 4), False, False, norm=1.0, std=0.2,
                         grad_norm=None),
              zero("q.A"), zero("q.B"),
              ParamTrace("head.weight", "head", (4, 4), True, True, norm=1.0, std=0.2,
                         grad_norm=0.5, grad_steps=steps, lr=lr, first_norm=1.0)]
    if bias_trains:
        params += [ParamTrace("f.weight", "f", (4, 4), True, True, norm=1.0, std=0.2,
                              grad_norm=0.0, grad_steps=steps, lr=lr, first_norm=1.0),
                   zero("f.bias")]
    per_step = [{"step": i, "param_grad_norms": {p.name: p.grad_norm for p in params
                                                 if p.grad_norm is not None}}
                for i in range(steps)]
    modules = {n: module(n, "Linear") for n in ("q", "q.base", "head", "f")}
    return RunTrace(params=params, modules=modules, per_step=per_step, observed_steps=steps)


@pytest.mark.parametrize("steps, lr, reported", [
    (wiring.STUCK_STEPS, 1e-3, True), (wiring.STUCK_STEPS - 1, 1e-3, False),
    (wiring.STUCK_STEPS, 0.0, False)])
def test_tl505_two_factors_stuck_at_zero(steps, lr, reported):
    """LoRA's A and B both at 0 never get a gradient. Fewer steps than a chain of zero
    factors needs to unlock (adaLN-Zero), or a rate of 0 (a warmup's start), prove nothing."""
    found = [h for h in hits("TL505", _lora(steps, lr)) if "exactly 0" in h.message]
    assert bool(found) is reported
    if reported:
        assert found[0].module == "q" and found[0].evidence["params"] == ["q.A", "q.B"]
    beside = [h for h in hits("TL505", _lora(steps, lr, bias_trains=True))
              if "exactly 0" in h.message]
    assert [h.evidence["modules"] for h in beside] == ([["q"]] if reported else [])


def test_tl505_factors_stuck_behind_a_layer_frozen_at_zero_name_that_layer():
    """A ControlNet whose zero conv was frozen by mistake: its zero-initialized input conv
    never gets a gradient, and the fix read 'initialize one factor randomly', which leaves
    the branch cut; the frozen layer is the fix (unfrozen, the loss fell 2.30 -> 2.16)."""
    t = _lora(wiring.STUCK_STEPS, 1e-3)
    [found] = [h for h in hits("TL505", t) if "exactly 0" in h.message]
    assert "kaiming_uniform_" in found.fix
    t.params += [param(f"gate.{n}", (4,), requires_grad=False, in_optimizer=False,
                       norm_before=0.0, grad_norm=None, grad_steps=0) for n in ("weight", "bias")]
    [found] = [h for h in hits("TL505", t) if "exactly 0" in h.message]
    assert "kaiming_uniform_" in found.fix  # never called (an inactive adapter): no cut
    t.layers.append(point("gate", "ZeroConv", depth=9))
    [found] = [h for h in hits("TL505", t) if "exactly 0" in h.message]
    assert "let 'gate' train" in found.fix and "kaiming_uniform_" not in found.fix


@pytest.mark.parametrize("seen", [wiring.INTERIM_STEPS_SEEN - 1, wiring.INTERIM_STEPS_SEEN])
def test_tl505_mid_run_it_waits_for_as_many_steps_as_a_check(seen):
    """At step 0 alone, fail_on stopped a multi-task model whose other task's head idled that
    step, and a transformer whose block LayerDrop skipped; both trained."""
    params = [param("body.weight", (4, 4)),
              param("head_b.weight", (4, 4), grad_steps=0, grad_norm=None)]
    idle = trace([], params=params, observed_steps=seen, mode="monitor")
    assert hits("TL505", idle)
    idle.interim = True
    if seen >= wiring.INTERIM_STEPS_SEEN:
        assert hits("TL505", idle)
    else:
        with pytest.raises(Skip, match="mid-run"):
            hits("TL505", idle)


def test_tl602_running_statistics_settle_by_their_momentum():
    """(1 - momentum) ** batches of the init left, at most INIT_WEIGHT_LEFT; a cumulative
    average (momentum None) after any batch; never at momentum 0."""
    import math

    needed = math.ceil(math.log(wiring.INIT_WEIGHT_LEFT) / math.log(0.9))
    assert not wiring._settled([needed - 1, 0.1]) and wiring._settled([needed, 0.1])
    assert not wiring._settled([0, None]) and wiring._settled([1, None])
    assert not wiring._settled([10 ** 6, 0.0]) and not wiring._settled(None)
