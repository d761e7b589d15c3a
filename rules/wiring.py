"""How the training step is wired: parameters, optimizer, loss and train/eval mode."""

from __future__ import annotations

import math
from typing import Iterator, Optional

from trainlint.engine import Hit, Skip, Thresholds, rule
from trainlint.trace import ModuleFacts, ParamTrace, RunTrace

from ._graph import (
    BATCHNORM_TYPES,
    DROPOUT_TYPES,
    RNN_TYPES,
    ancestors,
    frozen_at_zero,
    kept_in_eval,
    layer_at,
    maximal_groups,
    module_expr,
    only_shape_ops,
    output_layer,
    trained_twin,
)
from .run import unknown_loss


def _listed(names: list, limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _stopped_before_backward(trace: RunTrace) -> int:
    """How many of a check's steps ended before their backward: a BatchNorm that saw one value
    per channel stops the forward (TL404), a loss that choked on NaN outputs (TL504)."""
    return sum(1 for e in trace.errors if e.get("phase") in ("forward", "loss"))


def _where(module: str) -> str:
    return f"module {module!r}" if module else "the model itself"


# Modules whose children the code that holds them calls: an unused child is that code's.
_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
# A relative change of a parameter's norm between observed steps that an update made (a
# norm recomputed from values that did not change is the same to the last bit).
CHANGE = 1e-9
# Packages of published models, whose forward decides what a task head uses (a package of
# the user's own, installed, is the user's code).
_MODEL_LIBRARIES = ("transformers", "timm", "diffusers", "torchvision", "torchaudio", "peft",
                   "open_clip", "sentence_transformers", "torch")


def _library_owner(trace: RunTrace, module: str, unused: set,
                   trainable: list) -> Optional[ModuleFacts]:
    """The library module whose own forward leaves ``module``'s unused parameters out:
    ``module`` itself when only some of its parameters are unused, else the nearest ancestor
    that is not a container (some of whose parameters train: ``module`` is the outermost
    unused one). None when user code owns them: a backbone a ``.detach()`` cuts off whole is
    the user's model's part."""
    inside = [p.name for p in trainable if not module or p.name.startswith(module + ".")]
    owner: Optional[str] = module
    if all(n in unused for n in inside):
        owner = next((a for a in ancestors(module)[1:]
                      if getattr(trace.modules.get(a), "base", "") not in _CONTAINERS), None)
    facts = trace.modules.get(owner) if owner is not None else None
    return facts if facts is not None and facts.library in _MODEL_LIBRARIES else None


def _reader(trace: RunTrace, owner: ModuleFacts) -> str:
    """Who reads the other output: the head of the library model in use, where that is a
    class other than the one that builds the unused layer (CLIPForImageClassification over
    the CLIPVisionModel that builds post_layernorm)."""
    root = trace.modules.get("")
    if root is None or root.library not in _MODEL_LIBRARIES or root.type == owner.type:
        return "the head"
    return f"the head of {root.type}"


def unrouted_experts(trace: RunTrace) -> set:
    """Experts of a mixture of experts that no observed step called: same-class members of
    a ``ModuleList``/``ModuleDict`` whose members that ran took different numbers of rows
    (each expert runs on the tokens its router sends it, and one sent none is not called)."""
    rows: dict = {}  # module -> the leading dim of its first observed point
    for lt in trace.ordered_layers():
        if lt.shape:
            for name in ancestors(lt.module):
                rows.setdefault(name, lt.shape[0])
    groups = _member_groups(trace)
    unrouted: set = set()
    for members in groups.values():
        ran = {rows[m] for m in members if m in rows}
        if len(ran) > 1:
            unrouted.update(m for m in members if m not in rows)
    return unrouted


# Below this chance that some member of a group of blocks skipped at random (LayerDrop) was
# skipped at every observed step, one that was is reported as unused (TL505).
SKIP_CHANCE = 0.01


def _member_groups(trace: RunTrace, parents: tuple = ("ModuleList", "ModuleDict")) -> dict:
    """Same-class members of each container of a class in ``parents``: (parent, class) ->
    names."""
    groups: dict = {}
    for name, facts in trace.modules.items():
        parent = name.rpartition(".")[0]
        if name and getattr(trace.modules.get(parent), "base", "") in parents:
            groups.setdefault((parent, facts.type), []).append(name)
    return groups


def skipped_at_random(trace: RunTrace, trainable: list) -> set:
    """Blocks that got no gradient at any observed step among same-class siblings skipped at
    some steps and not others (LayerDrop, stochastic depth that skips a whole block per
    batch), where that could be chance: with each sibling's share of steps without a gradient
    as the skip rate, some member of the group goes without at all ``n`` observed steps with
    a chance of at least ``SKIP_CHANCE``. Siblings in a ``Sequential`` count too (a ResNet
    stage of blocks, each of which skips its own branch), and so do the blocks of one class
    over all the stages that hold them (a stage of two blocks says little on its own), where
    the class is not torch's own (a Linear or a Sequential anywhere is no stage's block)."""
    n = trace.observed_steps
    groups = _member_groups(trace, ("ModuleList", "ModuleDict", "Sequential"))
    for (_, cls), names in list(groups.items()):  # a block class over several stages too
        if getattr(trace.modules.get(names[0]), "library", None) != "torch":
            groups.setdefault(("*", cls), []).extend(names)
    members = {m for names in groups.values() for m in names}
    steps: dict = {}  # member -> observed steps with a gradient at any of its parameters
    for p in trainable:
        for owner in ancestors(p.module):
            if owner in members:
                steps[owner] = max(steps.get(owner, 0), p.grad_steps)
    skipped: set = set()
    for names in groups.values():
        ran = [steps[m] for m in names if steps.get(m, 0) > 0]
        if n < 1 or not any(k < n for k in ran):
            continue  # every sibling that ran, ran at every step: nothing is random here
        rate = 1.0 - sum(ran) / (len(ran) * n)
        if 1.0 - (1.0 - rate ** n) ** len(names) >= SKIP_CHANCE:
            skipped.update(m for m in names if m in steps and steps[m] == 0)
    return skipped


def skips_steps(trace: RunTrace) -> bool:
    """Whether steps went unobserved between the observed ones (a Monitor's ``every`` > 1)."""
    steps = [s["step"] for s in trace.per_step]
    return any(b - a > 1 for a, b in zip(steps, steps[1:]))


def _changed(norms: list) -> bool:
    """Whether these norms of one parameter (the finite ones) differ by more than ``CHANGE``."""
    norms = [n for n in norms if math.isfinite(n)]
    return len(norms) >= 2 and max(norms) - min(norms) > CHANGE * max(abs(n) for n in norms)


def changed_between(p: ParamTrace) -> bool:
    """Whether the parameter's norm before the observed optimizer steps changed from one to
    another (so something updated it in between)."""
    return _changed(list(p.norms_before))


# Observed steps (of several) at which a parameter no optimizer holds must change outside the
# forward to count as updated by the user's code: a clip of every weight changes it once.
MOVED_STEPS = 2


def updated_elsewhere(p: ParamTrace) -> bool:
    """Whether no optimizer stepped the parameter at the observed steps, yet the user's code
    updates it (a BYOL/MoCo target kept as an exponential moving average of the online
    network, a DQN target copied now and then): its norm changed from the first observed step
    to the last, or its values changed outside the forward within the one observed step, or
    within two of several (a clip of every weight in the loop changes them once)."""
    return not p.norms_before and (
        0 < min(MOVED_STEPS, p.outside_checks) <= p.moved_outside
        or (p.first_norm is not None and _changed([p.first_norm, p.norm])))


# Judged mid-run to stop it (a Monitor's fail_on), TL505 waits for this many observed steps:
# at step 0 alone, a multi-task model's idle head (task accuracies then 0.91 and 0.88) and a
# block LayerDrop skipped (loss 1.355 -> 0.361) stopped healthy runs.
INTERIM_STEPS_SEEN = 3


@rule("TL505", "unused-parameters", "warning")
def unused_parameters(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Trainable parameters that never get a gradient.

    ## What it does
    Lists parameters with ``requires_grad=True`` whose ``.grad`` is still None after every
    observed backward pass, while other parameters do get gradients (in a ``trainlint
    check``, which runs the backward itself, none getting one is reported too: the loss was
    cut off from the model). Parameters of one unused
    submodule are reported together, at that submodule.

    ## Why is this bad?
    The parameter does not take part in the loss: a layer built but not called in
    ``forward``, a branch cut off by ``.detach()``/``torch.no_grad()``, an output that is not
    used. It never learns, wastes memory and optimizer state, and makes
    ``DistributedDataParallel`` fail ("Expected to have finished reduction in the prior
    iteration") unless ``find_unused_parameters=True``, which costs time on every step.

    ## Example
    ``self.aux_head = nn.Linear(256, 10)`` built in ``__init__`` but never used in ``forward``.

    ## Fix
    Use the layer in ``forward`` (or drop it), remove the stray ``.detach()``, or freeze it on
    purpose with ``requires_grad_(False)``.

    Experts of a mixture of experts that no observed step called are not reported: among
    same-class members of a ``ModuleList``/``ModuleDict``, the ones that ran took different
    numbers of rows (the tokens routed to each), so one sent no token is not called at all;
    with few tokens per step (a check's batch) many are not.

    Nor are blocks skipped at random (LayerDrop, stochastic depth that skips a whole block
    per batch: ``if random() < p: continue``) that no observed step happened to run: among
    same-class siblings of which some got a gradient at some observed steps and not others,
    a block without any is left out while the chance that some sibling goes without at every
    observed step, each at the siblings' measured rate, is at least ``SKIP_CHANCE`` (1%), in
    a run observed at every step (with steps between observations, a block skipped at random
    changed between them, and one never used did not: a task head a sampler never picks).

    Where the unused module ran with autograd off inside the training forward
    (``torch.no_grad()`` around it, or ``torch.utils.checkpoint(..., use_reentrant=True)`` on
    inputs that need no gradient, whose outputs then need none), the finding says so and the
    fix turns autograd on there (``use_reentrant=False``). Where that module is a copy of one
    that trains (the same class, parameter names and shapes: a BYOL/MoCo target, a mean
    teacher), the fix freezes it instead: trained through the loss, a BYOL target collapsed
    (linear probe 0.264 against 0.389 as written). A check, which runs none of the user's
    loop and so never sees the target's update, calls it info; a Monitor run in which its
    values never changed says that its update is missing.

    A parameter whose values changed from one observed step to another, in a run that
    observes every N-th step, is not reported: it trains at the steps in between (a task's
    head in round-robin multi-task training, every other step, observed with an even ``every``).
    Nor is one that no optimizer steps and whose values changed all the same (from one
    observed step to another, or within one: between its start and ``monitor.step()``): the
    user's code updates it (a BYOL/MoCo target network kept as a moving average of the
    online one).

    A module whose trainable parameters (two or more) are all exactly 0 and get a gradient of
    exactly 0 at every observed step (at least ``STUCK_STEPS``, at a learning rate above 0) is
    reported too: a product of two factors both initialized at 0 (LoRA's A and B) leaves
    each without a gradient, for good.

    A library's own design (info, not a warning): when the unused parameters belong to a
    module of a published-model library (transformers, timm, diffusers, torchvision, torch
    itself, ...) whose other parameters train, that library's forward leaves them out for
    this head: a pooler that a masked-LM or token head does not use, a mask token or
    embedding only pretraining reads. Unused parts that the user's code owns (its own
    modules, or a ``ModuleList`` its loop does not reach) stay warnings. Judged mid-run to
    stop a run (a Monitor's ``fail_on``), it waits for ``INTERIM_STEPS_SEEN`` (3) observed
    steps, as many as a check runs.
    """
    trainable = [p for p in trace.params if p.requires_grad]
    if not trainable or trace.observed_steps == 0:
        return
    if trace.interim and trace.observed_steps < INTERIM_STEPS_SEEN:
        raise Skip(f"judged mid-run to stop it (fail_on), it waits for {INTERIM_STEPS_SEEN} "
                   f"observed steps, as many as a check runs: a head of round-robin multi-task "
                   f"training or a block LayerDrop skipped gets no gradient at some steps; so "
                   f"far {trace.observed_steps}")
    if trace.mode == "check" and trace.observed_steps <= _stopped_before_backward(trace):
        raise Skip("the check stopped before its first backward pass (see the run's errors)")
    if not any(p.grad_steps for p in trainable):
        reached = any(lt.grad_norm for lt in trace.layers)
        if trace.mode == "check" and not reached:
            # Its own loop: the backward ran and reached no layer (not an optimizer fused into
            # the backward, which steps each parameter and drops its .grad in a hook).
            yield Hit(
                module="",
                message=(f"none of the model's {len(trainable)} trainable parameters got a "
                         f"gradient in {trace.observed_steps} training step(s): the loss's "
                         "backward does not reach the model, so nothing trains"),
                fix=("compute the loss from the model's outputs as they are: no .detach(), "
                     ".data, .item()/.numpy() round trip or torch.no_grad() between them and "
                     "the loss (requires_grad_() on a detached output makes the loss "
                     "differentiable but leaves the model out)"),
                evidence={"params": len(trainable), "observed_steps": trace.observed_steps},
            )
            return
        if trace.mode == "check":
            raise Skip("the backward reached the layers, but no parameter kept its .grad (an "
                       "optimizer fused into the backward, or a hook that clears them)")
        raise Skip("no parameter had a gradient at the observed steps (call monitor.step() "
                   "after optimizer.step() and before zero_grad())")
    gaps = skips_steps(trace)
    # Between observations a block skipped at random trains (changed_between below tells);
    # a block never used does not: the chance argument is only for runs observed throughout.
    unrouted = unrouted_experts(trace) | (set() if gaps else skipped_at_random(trace, trainable))
    unused = {p.name for p in trainable if p.grad_steps == 0
              and not any(a in unrouted for a in ancestors(p.module))
              and not (gaps and changed_between(p)) and not updated_elsewhere(p)}
    stuck = _zero_products(trace, trainable)
    if stuck:
        yield Hit(
            module=_common_module(sorted(stuck)),
            message=(f"{len(stuck)} module(s) hold trainable parameters that are all exactly 0 "
                     f"and got a gradient of exactly 0 at each of the {trace.observed_steps} "
                     f"observed step(s): {_listed(sorted(stuck))} "
                     f"({_listed(sorted(n for names in stuck.values() for n in names))}); each "
                     "multiplies another that is 0 too (a product of two factors both "
                     "initialized at 0, as LoRA's A and B), so no gradient reaches either and "
                     "they never move"),
            fix=_zero_product_fix(trace),
            evidence={"params": sorted(n for names in stuck.values() for n in names),
                      "modules": sorted(stuck), "observed_steps": trace.observed_steps},
        )
    if not unused:
        return
    groups = maximal_groups(unused, {p.name for p in trainable}, params=True)
    for module, names in groups.items():
        # A group at the model itself holds the model's own parameters: name them.
        what = repr(module) if module else _listed([repr(n) for n in names])
        found = (f"{len(names)} trainable parameter(s) of {_where(module)} got no gradient "
                 f"in {trace.observed_steps} observed step(s): {_listed(names)}; ")
        evidence = {"params": names, "observed_steps": trace.observed_steps}
        owner = _library_owner(trace, module, unused, trainable)
        ran = any(lt.module == module or lt.module.startswith(module + ".")
                  for lt in trace.layers) if module else False
        if owner is not None and owner.name == "" and trace.rootless and ran:
            # The model's own forward did not run: the training step called these modules
            # itself and cut them off (model.bert(...).detach()); that wiring is the user's.
            owner = None
        if owner is not None:
            use = (f"they run, but the loss does not depend on their output here "
                   f"({_reader(trace, owner)} reads another output)" if ran
                   else "its forward does not use them here")
            option = (" (add_pooling_layer=False for a pooler)"
                      if "pooler" in module.rpartition(".")[2] else "")
            yield Hit(
                module=module,
                message=(found + f"the {owner.library} class {owner.type} builds them and "
                         f"{use}, while its other parameters train"),
                fix=("nothing to change for single-device training; under "
                     "DistributedDataParallel they need find_unused_parameters=True, or leave "
                     "them out: requires_grad_(False) on them, or the library's option that does "
                     f"not build them{option}"),
                evidence={**evidence, "owner": owner.name, "library": owner.library},
                severity="info",
            )
            continue
        gradless = bool(module) and any(m == module or m.startswith(module + ".")
                                        for m in trace.gradless)
        twin = trained_twin(trace, module) if gradless else None
        if twin is not None:
            yield _target_copy(trace, module, twin, found, evidence)
            continue
        if gradless:
            yield Hit(
                module=module,
                message=found + ("it ran with autograd off inside the training forward "
                                 "(torch.no_grad() around it, or torch.utils.checkpoint with "
                                 "use_reentrant=True on inputs that need no gradient: its "
                                 "outputs then need none), so no gradient reaches them"),
                fix=(f"run {what} with autograd on: torch.utils.checkpoint(..., "
                     "use_reentrant=False) (or an input that requires grad), no "
                     "torch.no_grad() around it; if it is meant to stay fixed, freeze it "
                     "with requires_grad_(False)"),
                evidence={**evidence, "ran_without_autograd": True},
            )
            continue
        yield Hit(
            module=module,
            message=found + "they do not take part in the loss",
            fix=(f"use {what} in forward (or delete it), remove a .detach() / "
                 "torch.no_grad() that cuts it off, or freeze it with requires_grad_(False); "
                 "under DistributedDataParallel unused parameters need "
                 "find_unused_parameters=True, which slows every step"),
            evidence=evidence,
        )


def _target_copy(trace: RunTrace, module: str, twin: str, found: str, evidence: dict) -> Hit:
    """TL505 for a copy of a module that trains, run with autograd off: a target or teacher
    network, which the user's code updates (a check runs no loop of the user's: info) or, in a
    Monitor run where its values never changed, whose update is missing."""
    what = (f"it has the class and parameter shapes of {twin!r}, which trains, and ran with "
            "autograd off: a target or teacher network (BYOL, MoCo, a mean teacher, a DQN "
            "target)")
    freeze = f"call {module_expr(module)}.requires_grad_(False)"
    if trace.mode == "check":
        return Hit(module=module,
                   message=found + what + ", which the training loop updates (a check runs "
                   "none of it)",
                   fix=f"{freeze} so that autograd, optimizers and DistributedDataParallel "
                       "leave it out; keep it out of the gradient (training it through the "
                       "loss collapses a BYOL target)",
                   evidence={**evidence, "copy_of": twin}, severity="info")
    return Hit(module=module,
               message=found + what + f", yet its values never changed over the "
               f"{trace.observed_steps} observed step(s): nothing updates it",
               fix=(f"update it every step, as a moving average of {twin!r} (with "
                    "torch.no_grad(): t.mul_(m).add_(o, alpha=1 - m) for each pair of "
                    f"parameters) or by copying it every N steps; then {freeze}"),
               evidence={**evidence, "copy_of": twin})


# Observed steps with a gradient a parameter stuck at 0 needs: a chain of zero-initialized
# factors (adaLN-Zero's gate, then the zero-initialized layer it scales) unlocks one link a
# step.
STUCK_STEPS = 3


def _zero_products(trace: RunTrace, trainable: list) -> dict:
    """``{module: its parameter names}`` of the innermost modules whose trainable parameters
    (two or more) are all :func:`_stuck_at_zero`: the two factors of a product, both at 0 (a
    LoRA layer's A and B beside its frozen base). A zero bias beside a weight that trains is
    not one (a ReZero branch behind its alpha at 0, a head behind a dead layer: the
    gradient comes once the other moves, or is TL101's)."""
    stuck = {p.name for p in trainable if _stuck_at_zero(trace, p)}
    found: dict = {}
    for name in sorted(stuck):
        for module in ancestors(name.rpartition(".")[0])[:-1]:  # never the model itself
            inside = [p.name for p in trainable if p.name.startswith(module + ".")]
            if len(inside) >= 2 and all(n in stuck for n in inside):
                found[module] = inside
                break
            if any(n not in stuck for n in inside):
                break
    return found


def _zero_product_fix(trace: RunTrace) -> str:
    """The fix for factors stuck at 0: one of each product initialized randomly, or, where a
    layer at 0 is frozen, that layer trained: a frozen factor at 0 cuts the gradient to every
    factor behind it, whatever their init (a ControlNet whose zero conv was frozen)."""
    frozen = frozen_at_zero(trace)
    if frozen:
        return (f"let {_listed([repr(m) for m in frozen])} train (requires_grad_(True) and in "
                "the optimizer): frozen at 0, it multiplies everything behind it by 0, so no "
                "gradient reaches those whatever their init")
    return ("initialize one factor of each product randomly and keep the other at 0 "
            "(LoRA: nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5)), "
            "nn.init.zeros_(lora_B)), so the product starts at 0 yet both learn")


def _stuck_at_zero(trace: RunTrace, p: ParamTrace) -> bool:
    """Whether ``p`` is exactly 0 and got a gradient of exactly 0 at every observed step (at
    least ``STUCK_STEPS``) while its learning rate was above 0 (a warmup's first steps at 0
    move nothing): a factor of a product whose other factor is 0 too."""
    if p.grad_steps < STUCK_STEPS or p.norm != 0 or p.first_norm not in (0, None) or \
            p.grad_norm != 0 or p.lr == 0:
        return False
    norms = [s["param_grad_norms"].get(p.name) for s in trace.per_step
             if s.get("param_grad_norms")]
    return all(g == 0 for g in norms if g is not None)


def _common_module(modules: list) -> str:
    """The innermost module holding all of ``modules`` ("" = the model)."""
    return next(a for a in ancestors(modules[0]) if all(a in ancestors(m) for m in modules))


def _unregistered(holders: dict) -> Hit:
    """TL506 for layers or Parameters the loss uses that sit in plain Python containers."""
    listed = ", ".join(f"{name!r} ({count})" for name, count in sorted(holders.items()))
    return Hit(
        module="",
        message=(f"{sum(holders.values())} trainable tensor(s) the loss depends on sit in plain "
                 f"Python lists, tuples or dicts the model does not register: {listed}; "
                 "model.parameters(), and an optimizer built from it, leave them out, so they "
                 "never train (nor move with .to(), nor reach state_dict())"),
        fix=("hold those layers in nn.ModuleList / nn.ModuleDict (Parameters in "
             "nn.ParameterList / nn.ParameterDict) instead of a list, tuple or dict, and build "
             "the optimizer after"),
        evidence={"holders": dict(holders)},
    )


def _remade(shapes: tuple) -> Hit:
    """TL506 for layers built anew at every step (in the forward, or in the loss)."""
    listed = ", ".join(str(s) for s in shapes[:6]) + (" ..." if len(shapes) > 6 else "")
    return Hit(
        module="",
        message=(f"the loss runs through {len(shapes)} trainable tensor(s) outside the model that "
                 f"are new at every step (shapes {listed}): a layer built in forward() (or in "
                 "the loss), e.g. nn.Linear(64, 5)(h), starts from a fresh random init each "
                 "call, no optimizer holds it, and it never trains"),
        fix=("build the layer once, in __init__ (self.head = nn.Linear(...)), and call it in "
             "forward(); then build the optimizer from model.parameters()"),
        evidence={"remade_shapes": [list(s) for s in shapes]},
    )


def _trained_elsewhere(trace: RunTrace, trainable: int) -> Hit:
    """TL506 for a loss that runs through trainable tensors outside the model and its
    optimizer while none of the model's parameters got a gradient and that optimizer stepped:
    it steps parameters the loss does not use (a copy of the model trained in its place)."""
    copy = (" They have the shapes of the model's parameters, one for one: a copy of the model "
            "(copy.deepcopy, or a model rebuilt, after the optimizer was built) is trained in "
            "its place." if trace.foreign_copy else "")
    return Hit(
        module="",
        message=(f"the loss given to monitor.step() runs through {trace.foreign_params} trainable "
                 f"tensor(s) that are neither the model's nor in its optimizer, while none of "
                 f"the model's {trainable} trainable parameter(s) got a gradient in "
                 f"{trace.observed_steps} observed step(s): the optimizer given steps "
                 f"parameters the loss does not use, and not those it does.{copy}"),
        fix=("build the optimizer from the parameters of the module the training step runs, "
             "after any copy.deepcopy or rebuild that makes new ones, and give that module to "
             "the Monitor"),
        evidence={"foreign_params": trace.foreign_params, "model_params": trainable,
                  "copy": trace.foreign_copy, "observed_steps": trace.observed_steps},
    )


def _cleared_before_step(trace: RunTrace) -> Optional[Hit]:
    """TL506 for the gradients backward computed cleared before ``optimizer.step()`` used them
    (``zero_grad()`` between the two) at more than half of the observed steps judged (each a
    Monitor's verdict: :mod:`trainlint.gradclear`)."""
    judged = [s["step"] for s in trace.per_step if "grads_cleared" in s]
    cleared = [s["step"] for s in trace.per_step if s.get("grads_cleared")]
    if not cleared or 2 * len(cleared) <= len(judged):
        return None
    weights = [p for p in trace.params if p.requires_grad and p.update_norms]
    still = [p for p in weights if all(u == 0 for u in p.update_norms)]
    unchanged = (f"; the observed steps left {len(still)} of {len(weights)} parameter(s) "
                 "exactly unchanged" if still else "")
    return Hit(
        module="",
        message=(f"at {len(cleared)} of {len(judged)} observed optimizer step(s) (first at step "
                 f"{cleared[0]}) the gradients backward computed were cleared before "
                 "optimizer.step() used them (.grad None, or zeroed in place): zero_grad() is "
                 "called between loss.backward() and optimizer.step(), so the optimizer never "
                 f"updates the trainable parameters from their gradients{unchanged}"),
        fix=("call optimizer.zero_grad() before loss.backward() (zero_grad, forward, loss, "
             "backward, step), or right after optimizer.step(); never between backward and "
             "step"),
        evidence={"cleared_steps": cleared, "judged_steps": len(judged),
                  "unchanged_params": len(still)},
    )


@rule("TL506", "parameters-not-in-optimizer", "error")
def parameters_not_in_optimizer(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Trainable parameters that no optimizer param group holds.

    ## What it does
    Lists parameters with ``requires_grad=True`` that are in none of the optimizer's param
    groups. Parameters of one submodule are reported together.

    ## Why is this bad?
    They get gradients but are never updated: that part of the model silently stays at its
    init. Usual causes: the optimizer was built before a layer was added or replaced
    (``model.fc = nn.Linear(...)`` after ``Adam(model.parameters())``), or param groups
    listed by hand missed a module.

    ## Example
    ``opt = Adam(model.backbone.parameters())`` while ``model.head`` is trainable.

    Layers the loss uses that sit in a plain Python list, tuple or dict attribute
    (``self.proj = [nn.Linear(...), ...]`` instead of ``nn.ModuleList``) are reported too:
    the model does not register them, so ``model.parameters()`` leaves them out (a GRU
    seq2seq whose output projections sat in a list stayed at loss 2.01 against 0.52).

    In a Monitor run, a loss that runs through trainable tensors outside the model and its
    optimizer while none of the model's parameters gets a gradient, and that optimizer steps,
    is reported too: the optimizer steps parameters the loss does not use (a
    ``copy.deepcopy`` of the model made after the optimizer was built, and trained in its
    place: the finding says so when those tensors have the model's parameter shapes one for
    one).

    Parameters whose values changed all the same (between the first and the last observed
    step, or within one, between its start and ``monitor.step()``) are updated by the user's
    code (a BYOL/MoCo target network kept as a moving average of the
    online one): they are not reported. Nor are parameters that got no gradient at any
    observed step while others did (TL505 reports those): an optimizer would not move them
    either (a linear probe whose backbone runs under ``torch.no_grad()`` with
    ``requires_grad`` left on: an optimizer given ``model.parameters()`` left it
    bit-identical, loss 3.11 -> 0.062 either way).

    In a ``trainlint check``, a loss that runs through Parameters outside the model at its
    first step and, at its second, through others of the same shapes and none of the first's
    is reported too: a layer built anew in every forward (``nn.Linear(64, 5)(h)``) starts from
    a fresh init at each call and never trains (loss 1.62 -> 1.61 over 100 steps against
    1.66 -> 1.16 with the layer built in ``__init__``).

    In a Monitor run, gradients that the backward computed and that were cleared before
    ``optimizer.step()`` ran (``.grad`` None, or zeroed in place) at more than half of the
    observed optimizer steps are reported too: ``optimizer.zero_grad()`` or
    ``model.zero_grad()`` called between ``loss.backward()`` and ``optimizer.step()`` leaves
    every parameter at its init (Adam, SGD and AdamW on an MLP: weights bit-identical after
    400 steps, accuracy 0.098 against 0.709 in the right order), while TL503 sees no
    gradient to judge an update by. A few of each optimizer's parameters are watched from the
    backward to the step; a step that runs a closure (LBFGS) is not judged, nor a parameter
    the backward gave no gradient (frozen or unused ones are TL505's). A step's gradients
    count as cleared when every parameter the optimizer holds has ``.grad`` None, or when
    those left are all zeros, read whole where they hold ``FULL_READ`` (2^20) elements at
    most in all (``zero_grad(set_to_none=False)``; a larger model's are not judged): a loop
    may keep one layer's gradient, or a few rows of an embedding's, and clear the rest on
    purpose (textual inversion: said error, yet it trained, 0.83 -> 0.49; a model trained in
    its middle layer alone, 1.375 -> 1.136).

    ## Fix
    Build the optimizer from ``model.parameters()`` after the model is complete, or add the
    group: ``optimizer.add_param_group({"params": model.head.parameters()})``, or just the
    missing parameters when the module's others are in a group already (a parameter may be in
    only one group): ``[model.get_parameter("head.bias")]``; if they are frozen on purpose,
    ``requires_grad_(False)`` them. Gradients cleared before the step: call ``zero_grad()``
    before ``loss.backward()``, or right after ``optimizer.step()``.
    """
    cleared = _cleared_before_step(trace)
    if cleared is not None:
        yield cleared
    if trace.unregistered:
        yield _unregistered(trace.unregistered)
    if trace.remade_params:
        yield _remade(trace.remade_params)
    trainable = [p for p in trace.params if p.requires_grad]
    if not trainable:
        return
    if all(p.in_optimizer is None for p in trainable):
        raise Skip("no optimizer was given (pass optimizer= to the Monitor)")
    if trace.foreign_params and not trace.adversarial and trace.optimizer_stepped and \
            trace.observed_steps and all(p.grad_steps == 0 for p in trainable):
        yield _trained_elsewhere(trace, len(trainable))
        return
    # Parameters no backward reached while others' did are TL505's: an optimizer holding them
    # would not move them either (a backbone run under torch.no_grad() for a linear probe).
    reached = any(p.grad_steps for p in trainable)
    missing = {p.name for p in trainable if p.in_optimizer is False
               and not updated_elsewhere(p) and not (reached and p.grad_steps == 0)}
    groups = maximal_groups(missing, {p.name for p in trainable}, params=True)
    for module, names in groups.items():
        under = [p for p in trace.params if not module or p.name.startswith(module + ".")]
        if any(p.in_optimizer for p in under):  # adding them all would add some twice
            target = "[" + ", ".join(f"model.get_parameter({n!r})" for n in names) + "]"
        else:
            target = f"{module_expr(module)}.parameters()" if module else "model.parameters()"
        yield Hit(
            module=module,
            message=(f"{len(names)} trainable parameter(s) of {_where(module)} are in no "
                     f"optimizer param group, so they are never updated: {_listed(names)}"),
            fix=(f"build the optimizer after the model is complete, from model.parameters(), or "
                 f"optimizer.add_param_group({{'params': {target}}}); if they are frozen on "
                 "purpose, call requires_grad_(False) on them"),
            evidence={"params": names},
        )


# (output activation, loss kind) -> (severity override or None, what the loss does again)
DOUBLE = {
    ("softmax", "cross_entropy"): (None, "CrossEntropyLoss applies log_softmax itself"),
    ("softmax", "nll"): (None, "NLLLoss expects log-probabilities, not probabilities"),
    ("log_softmax", "cross_entropy"): (
        None, "CrossEntropyLoss applies log_softmax again (the loss comes out the same, "
              "log_softmax being idempotent, but the model's outputs are not the logits the "
              "loss takes, nor what code reading them as logits expects)"),
    ("sigmoid", "bce_with_logits"): (None, "BCEWithLogitsLoss applies the sigmoid itself"),
}


# Clamping probabilities away from 0 and 1 leaves them probabilities.
CLAMP_OPS = frozenset({"clamp", "clip", "clamp_min", "clamp_max"})


@rule("TL601", "double-softmax", "error")
def double_softmax(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """The model already ends in softmax/sigmoid and the loss applies it again.

    ## What it does
    Looks at the operation that produced the model's output (a module such as ``nn.Softmax``
    or a functional ``F.softmax``/``torch.sigmoid`` in ``forward``, through reshapes and
    clamps such as ``.clamp(min=1e-7)`` only) and at the loss: softmax into
    ``CrossEntropyLoss`` or ``NLLLoss``, log_softmax into ``CrossEntropyLoss`` (log-softmax
    twice: the same loss value, from outputs that are not logits), sigmoid into
    ``BCEWithLogitsLoss``. The same bug made in the loss function
    (``F.cross_entropy(out.softmax(-1), y)``, a sigmoid before
    ``binary_cross_entropy_with_logits``) is read from the loss's autograd graph: a
    softmax/sigmoid between a model output and such a loss.

    ## Why is this bad?
    ``CrossEntropyLoss`` expects raw logits: fed probabilities, it squashes them into [0, 1]
    before its own softmax, so the loss can never get near 0 and the gradients shrink ~C×;
    training stalls at a poor accuracy. ``NLLLoss`` on probabilities computes a meaningless
    loss; ``BCEWithLogitsLoss`` after a sigmoid has the same problem as the first.

    ## Example
    ``nn.Sequential(..., nn.Linear(128, 10), nn.Softmax(dim=1))`` trained with
    ``nn.CrossEntropyLoss()``.

    ## Fix
    Return logits from ``forward`` and apply softmax/sigmoid only at inference; or keep
    ``log_softmax`` and use ``NLLLoss``. Softmax into ``NLLLoss``: log_softmax instead of
    softmax (or logits with ``CrossEntropyLoss``), never raw logits into ``NLLLoss``, which
    has no lower bound.
    """
    if trace.loss_kind is None:
        raise Skip(unknown_loss(trace))
    entry = DOUBLE.get((trace.loss_squash, trace.loss_kind))
    if entry is not None:  # the loss function squashed the model's output itself
        head = output_layer(trace)
        yield Hit(
            module=head.module if head is not None else "",
            message=(f"the loss function applies {trace.loss_squash} to the model's output "
                     f"before {trace.loss_kind}: {entry[1]}"),
            fix=_double_fix(trace.loss_squash, trace.loss_kind, "in the loss function"),
            evidence={"loss_op": trace.loss_squash, "loss": trace.loss_kind},
        )
        return
    if trace.loss_reads_output is False:  # e.g. nll_loss(torch.log(probs)): applied as meant
        return
    for origin, via in trace.output_ops[:1]:
        lt = layer_at(trace, origin) if origin[0] == "point" else None
        if lt is None or not only_shape_ops(tuple(op for op in via if op not in CLAMP_OPS)):
            continue
        entry = DOUBLE.get((lt.kind, trace.loss_kind))
        if entry is None:
            continue
        classes = trace.num_classes
        if classes and lt.shape and classes not in (lt.shape[1:2] + lt.shape[-1:]):
            continue
        severity, why = entry
        yield Hit(
            module=lt.module,
            message=(f"the model's output comes from {lt.kind} ({lt.label}) and the loss is "
                     f"{trace.loss_kind}: {why}"),
            fix=_double_fix(lt.kind, trace.loss_kind, "in forward"),
            evidence={"output_op": lt.kind, "loss": trace.loss_kind},
            severity=severity,
        )


def _double_fix(squash: str, loss: str, where: str) -> str:
    """TL601's fix for ``squash`` (softmax, log_softmax, sigmoid) applied ``where`` before
    ``loss``."""
    if loss == "nll":
        # NLLLoss on raw logits has no lower bound: the loss needs log-probabilities.
        return (f"use log_softmax instead of {squash} {where} (nn.LogSoftmax(dim=1) / "
                "F.log_softmax) and keep NLLLoss; or return the raw logits and use "
                "nn.CrossEntropyLoss, which is log_softmax + NLLLoss in one (NLLLoss on raw "
                "logits is unbounded below)")
    fix = (f"pass the raw logits to the loss (drop the {squash} {where}) and apply {squash} "
           "only at inference")
    return fix + ("; or keep log_softmax with nn.NLLLoss" if squash == "log_softmax" else "")


MODE_TYPES = BATCHNORM_TYPES + DROPOUT_TYPES
# Layers with a dropout inside, which their dropout argument switches on (an RNN's acts only
# between its stacked layers).
DROPOUT_INSIDE = ("MultiheadAttention",) + RNN_TYPES


def _mode_dependent(facts: ModuleFacts) -> bool:
    """Whether the module behaves differently in train and eval mode (a Dropout of p=0 and a
    BatchNorm without running statistics do not)."""
    if facts.base in DROPOUT_TYPES:
        return facts.attrs.get("p", 0.5) != 0
    if facts.base in BATCHNORM_TYPES:
        return facts.attrs.get("track_running_stats", True) is not False
    if facts.base not in DROPOUT_INSIDE or not facts.attrs.get("dropout"):
        return False
    return facts.base == "MultiheadAttention" or facts.attrs.get("num_layers", 1) > 1


# A BatchNorm's running statistics have settled once their init's weight in them,
# (1 - momentum) ** num_batches_tracked, is at most this share: 22 batches at momentum 0.1. One
# batch leaves 90% of it: a from-scratch net whose BatchNorms ran once in train mode and then
# stayed in eval did not learn (accuracy 0.127, as at the init's statistics).
INIT_WEIGHT_LEFT = 0.1


def _settled(tracked: Optional[list]) -> bool:
    """Whether a BatchNorm's ``[num_batches_tracked, momentum]`` (a training flag) tell
    running statistics settled (any batch for a cumulative average, momentum None; never at
    momentum 0, which keeps the init's)."""
    if tracked is None:
        return False
    count, momentum = tracked
    if momentum is None or momentum >= 1:
        return count >= 1
    if momentum <= 0:
        return False
    return count >= math.ceil(math.log(INIT_WEIGHT_LEFT) / math.log(1 - momentum))


def _frozen_statistics(module: str, names: list, types: list, steps: int, observed: int) -> Hit:
    """TL602 as info: BatchNorms alone in eval while the model trains, with running statistics
    settled before: their statistics are kept frozen (a fine-tuning idiom), their affine
    weights still train."""
    return Hit(
        module=module,
        message=(f"{len(names)} {'/'.join(types)} layer(s) in module {module!r} were in eval "
                 f"mode during {steps} of {observed} observed training step(s) while the model "
                 f"trained, with running statistics settled before: they normalize with those "
                 f"frozen statistics (as mmdetection's norm_eval does when fine-tuning at small "
                 f"batches): {_listed(names)}"),
        fix=(f"nothing to change if frozen statistics are intended; otherwise call "
             f"model.train() rather than leaving {module!r}'s BatchNorms in eval"),
        evidence={"modules": names, "steps": steps, "observed_steps": observed,
                  "frozen_statistics": True},
        severity="info",
    )


# Model classes whose library puts them in train mode itself before training (transformers'
# Trainer, Lightning's): from_pretrained returns a model in eval mode, and that is no fault.
LIBRARY_TRAINED = frozenset({"PreTrainedModel", "LightningModule"})


def _given_in_eval(trace: RunTrace) -> Iterator[Hit]:
    """TL602 in a check: the model came in eval mode (``trace.given_flags``), with layers whose
    behaviour depends on the mode; the check trained it in train mode, a loop that never calls
    ``model.train()`` would not."""
    given = trace.given_flags
    mode_modules = {f.name for f in trace.modules.values() if _mode_dependent(f)}
    if given is None or given["model_training"] or LIBRARY_TRAINED.intersection(
            given.get("classes", ())) or not any(
            not kept_in_eval(trace, {"step": 0, **given}, n) for n in mode_modules):
        return
    yield Hit(
        module="",
        severity="warning",
        message=(f"the model was given in eval mode (model.training is False): its "
                 f"{len(mode_modules)} BatchNorm/Dropout layer(s) (or layers with a dropout "
                 "inside) behave as at inference in a training loop that does not call "
                 "model.train() (trainlint check trained it in train mode)"),
        fix=("call model.train() before training: build_model() (or the loaded model) returns "
             "it in eval mode"),
        evidence={"given_in_eval": True, "mode_layers": len(mode_modules)},
    )


@rule("TL602", "eval-mode-training", "error")
def eval_mode_training(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Training steps run while the model, or a BatchNorm/Dropout in it, is in eval mode.

    ## What it does
    At every observed step of a Monitor run it reads ``model.training`` and the mode of each
    BatchNorm/Dropout submodule (and of each MultiheadAttention and stacked RNN with a
    ``dropout`` argument, whose dropout is inside). It fires when the model is in eval mode
    (and has such layers, whose behaviour depends on the mode), or when one of those
    submodules is in eval mode while the model trains, at the outermost submodule whose such
    layers are all in eval (never at the model itself, which trains). Submodules frozen on
    purpose are left alone, also inside a model put in eval as a whole (a linear probe whose
    head has no such layers): they sit, at that step, inside a submodule in eval whose
    parameters are all frozen (``requires_grad=False``: a frozen backbone or teacher, a stage
    of gradual unfreezing not unfrozen yet), or a user
    class on their path overrides ``train()`` to keep them in eval (the detection-backbone
    idiom; library wrappers whose ``train()`` only passes the mode on, such as DDP or
    transformers' models, do not count). ``trainlint check`` puts the model in train mode
    itself (as a training loop's ``model.train()`` does, honouring ``train()`` overrides, and
    leaving a submodule in eval with all its parameters frozen as it was): there it reads the
    modes the user's own code set after that (a forward that calls ``self.bn.eval()``), and
    says, as a warning, when the model was given in eval mode as a whole (``build_model()``
    returning ``model.eval()``; not a transformers or Lightning model, whose trainers call
    ``train()`` themselves: ``from_pretrained`` returns one in eval mode). BatchNorms alone in
    eval while the model trains, whose running statistics had
    settled before (at each such step, their init's weight in them, ``(1 - momentum) **
    num_batches_tracked``, at most 10%: 22 batches at the default momentum), are reported as
    info: their statistics are kept frozen while their affine weights train, as mmdetection's
    ``norm_eval`` does when fine-tuning at small batches (a pretrained ResNet fine-tuned so at
    batch 4 fitted its training set as with BatchNorm in train mode). Left at their init
    statistics, or near them (a model trained from scratch, whose BatchNorms ran once in train
    mode), they do not normalize: an error.

    ## Why is this bad?
    In eval mode Dropout is off (no regularization) and BatchNorm normalizes with its running
    statistics and stops updating them: the model trains with different behaviour than
    intended, usually because ``model.eval()`` was called for validation and ``model.train()``
    never followed.

    ## Example
    A loop that validates with ``model.eval()`` at the end of epoch 1, and trains epoch 2
    without calling ``model.train()``.

    ## Fix
    Call ``model.train()`` at the start of every training epoch (after each validation pass).
    """
    if trace.mode != "monitor":
        found = list(_given_in_eval(trace)) + list(_eval_in_training(trace))
        if not found:
            raise Skip("trainlint check runs the model in train mode itself; a Monitor run "
                       "watches the mode the training loop uses")
        yield from found
        return
    yield from _eval_in_training(trace)


def _eval_in_training(trace: RunTrace) -> Iterator[Hit]:
    """TL602 on the modes read at each observed step's training forward (in a check, only
    what the user's code set after the check's own ``model.train()``: a forward that calls
    ``self.bn.eval()``)."""
    flags = trace.train_flags
    if not flags:
        return
    mode_modules = {f.name for f in trace.modules.values() if _mode_dependent(f)}
    # The mode layers that matter at a step in eval: those not frozen on purpose then.
    eval_steps = [f["step"] for f in flags if not f["model_training"]
                  and any(not kept_in_eval(trace, f, n) for n in mode_modules)]
    if eval_steps and mode_modules:
        yield Hit(
            module="",
            message=(f"{len(eval_steps)} of {len(flags)} observed training step(s) ran with the "
                     f"model in eval mode (model.training is False; first at step "
                     f"{eval_steps[0]}): its {len(mode_modules)} BatchNorm/Dropout layer(s) "
                     "(or layers with a dropout inside) behave as at inference"),
            fix="call model.train() before the training steps (after every validation pass)",
            evidence={"eval_steps": len(eval_steps), "observed_steps": len(flags),
                      "first_step": eval_steps[0]},
        )
        return
    bad: dict[str, int] = {}
    unsettled: set = set()  # in eval at a step whose running statistics had not settled
    for f in flags:
        if f["model_training"]:
            for name in f["eval_modules"]:
                if name in mode_modules and not kept_in_eval(trace, f, name):
                    bad[name] = bad.get(name, 0) + 1
                    if not _settled(f.get("norm_batches", {}).get(name)):
                        unsettled.add(name)
    if not bad:
        return
    # The model trains: a group is a submodule (the model itself is not left in eval).
    groups = maximal_groups(set(bad), mode_modules, params=False, root=False)
    for module, names in groups.items():
        steps = max(bad[n] for n in names)
        types = sorted({trace.modules[n].type for n in names})
        if not unsettled.intersection(names):
            yield _frozen_statistics(module, names, types, steps, len(flags))
            continue
        yield Hit(
            module=module,
            message=(f"{len(names)} {'/'.join(types)} layer(s) in module {module!r} were in eval "
                     f"mode during {steps} of {len(flags)} observed training step(s) while the "
                     f"model trained: {_listed(names)}"),
            fix=(f"call model.train() rather than leaving {module!r} in eval; to "
                 "freeze BatchNorm on purpose, also freeze its parameters "
                 "(requires_grad_(False)) or override train() to keep it in eval"),
            evidence={"modules": names, "steps": steps, "observed_steps": len(flags)},
        )
