"""NaN/Inf (TL504): where a non-finite value first appeared, and what made it."""

from __future__ import annotations

import math
from typing import Iterator, Optional

from trainlint.engine import Hit, Thresholds, rule
from trainlint.trace import (
    GRADIENT_FREE_KINDS,
    RISKY_OPS,
    Edge,
    LayerTrace,
    RunTrace,
    inf_fill,
)

from ._graph import (
    SHAPE_OPS,
    WEIGHT_LAYERS,
    ancestors,
    attends,
    downstream,
    is_model_output,
    layer_at,
    only_shape_ops,
    output_nodes,
    successors,
)
from .gradients import INFLATED, outlier_batch


def _backward_maker(trace: RunTrace, step: dict, first: LayerTrace) -> Optional[tuple]:
    """``(module, gradient seen, via)`` of a module that takes ``first``'s output and whose own
    output gradient at ``step`` is finite (or was not observed): its backward made the NaN/Inf.
    A weight layer seen finite and fed through ops that cannot make NaN/Inf comes last (its
    backward can only overflow); then a seen finite gradient, and a module that is not a weight
    layer, come first."""
    bad = step["nonfinite"].get("gradients", {})
    layers = step.get("layers", {})
    found = []
    for name, via in _takers(trace, first.node):
        keys = [node[1:] for node in output_nodes(trace, name)]
        if any(key in bad for key in keys):
            continue
        seen = any(layers.get(key, {}).get("grad_norm") is not None for key in keys)
        weights = trace.modules[name].base in WEIGHT_LAYERS
        safe = seen and weights and not RISKY_OPS.intersection(via)
        found.append((safe, not seen, weights, name, via))
    if not found:
        return None
    _, unseen, _, name, via = min(found)
    return name, not unseen, via


def _takers(trace: RunTrace, node: tuple, depth: int = 0) -> list[tuple]:
    """``(module, via)`` of the modules that take ``node``'s output, looking through the
    activations whose output gradient the probe does not read (``GRADIENT_FREE_KINDS``:
    their backward only scales the gradient, and cannot make a NaN of finite values), modules
    or functional calls (``torch.relu`` in a block's forward), to the modules that take theirs."""
    found = []
    for dst, via in successors(trace, node):
        if dst[0] == "point":  # a functional activation
            lt = layer_at(trace, dst)
            if (depth < 4 and lt is not None and lt.kind in GRADIENT_FREE_KINDS
                    and lt.grad_norm is None):
                found += [(name, via + more) for name, more in _takers(trace, dst, depth + 1)]
            continue
        if dst[0] != "module" or not dst[1] or dst[1] not in trace.modules:
            continue
        outputs = [lt for lt in trace.layers if lt.module == dst[1] and lt.op == "output"]
        if depth < 4 and outputs and all(lt.kind in GRADIENT_FREE_KINDS and lt.grad_norm is None
                                         for lt in outputs):
            further = _takers(trace, outputs[0].node, depth + 1)
            if further:
                found += [(name, via + more) for name, more in further]
                continue
        found.append((dst[1], via))
    return found


def _first_nonfinite(trace: RunTrace, step: dict) -> Optional[tuple]:
    """(what, module, detail[, whether a computation's backward, not an overflow, made it])
    for the first place NaN/Inf shows in one observed step."""
    bad = step.get("nonfinite") or {}
    loss = step.get("loss")
    seen = (bad.get("activations") or bad.get("gradients") or bad.get("parameters")
            or bad.get("parameter_grads") or (loss is not None and not math.isfinite(loss))
            or _loss_raised(trace, step) is not None)
    if not seen:  # NaN/Inf only in an input or a module's output: a -inf mask, not a fault
        return None
    if bad.get("inputs"):
        return "input", "", (f"the batch holds NaN before the model runs "
                             f"({', '.join(bad['inputs'])})")
    stale = bad.get("parameters_before") or []
    if stale:
        owner = stale[0].rsplit(".", 1)[0] if "." in stale[0] else ""
        if trace.at_start(step):
            return "initial parameters", owner, (
                f"{len(stale)} parameter(s) held NaN/Inf before the first training step "
                f"({stale[:5]}): the model was built or loaded with them")
        return "stale parameter", owner, (
            f"{len(stale)} parameter(s) already held NaN/Inf when the step began "
            f"({stale[:5]}): it appeared at a step that was not observed")
    by_key = {lt.node[1:]: lt for lt in trace.layers}
    acts = [by_key[key] for key in bad.get("activations", {}) if key in by_key]
    infinite = _infinite_batch(trace, bad.get("infinite_inputs") or [], acts)
    if infinite is not None:
        return infinite
    later = bad.get("later_call", {})

    def depth(lt: LayerTrace) -> int:  # a shared module's call that held it, not its first
        return lt.depth + later.get(lt.node[1:], 0)
    first_depth = min((depth(lt) for lt in acts), default=math.inf)
    for name, after in bad.get("modules", []):  # in the order they finished
        if after < first_depth:  # before any observed output held NaN/Inf
            facts = trace.modules.get(name)
            kind = f" ({facts.type})" if facts is not None else ""
            return "forward", name, (
                f"the output of {name or 'the model'}{kind} holds NaN/Inf, made by its own "
                f"forward code: every layer output observed before it is finite")
        break
    if acts:
        first = min(acts, key=depth)
        made = (_made_on_the_way(trace, first, bad["activations"])
                or _fed_nonfinite(trace, first, bad["activations"])
                or _fed_untraced(trace, first, bad))
        if made is not None:
            return made
        count = bad["activations"][first.node[1:]]
        return "forward", first.module, (f"the output of {first.label} ({first.type}) holds "
                                         f"{count} NaN/Inf value(s)")
    if loss is not None and not math.isfinite(loss):
        return "loss", "", f"the loss is {loss} while every observed activation is finite"
    grads = [by_key[key] for key in bad.get("gradients", {}) if key in by_key]
    if grads:
        first = min(grads, key=lambda lt: (lt.backward_order is None, lt.backward_order or 0))
        detail = (f"the gradient at the output of {first.label} ({first.type}) is the first "
                  f"NaN/Inf in backward order")
        maker = _backward_maker(trace, step, first)
        if maker is None and loss is not None and math.isfinite(loss) and \
                is_model_output(trace, first):
            return "backward", "", (
                f"the gradient at the model's output ({first.label}, {first.type}) is the first "
                f"NaN/Inf in backward order, while the loss ({loss:.4g}) is finite: the loss "
                f"function's backward made it"), True
        if maker is None:
            return "backward", first.module, detail
        name, seen, via = maker
        facts = trace.modules[name]
        between = [op for op in via if op not in SHAPE_OPS]
        ops = f" (or in the ops between them: {', '.join(between)})" if between else ""
        gradient = ("is finite: the NaN/Inf was" if seen
                    else "was not observed: the NaN/Inf was most likely")
        detail = (f"{detail}, while the gradient at the output of {name} ({facts.type}), "
                  f"which takes it, {gradient} made in the backward of {name}{ops}")
        return "backward", name, detail, bool(between) or facts.base not in WEIGHT_LAYERS
    for what, names in (("parameter gradient", bad.get("parameter_grads", [])),
                        ("parameter", bad.get("parameters", []))):
        if names:
            owner = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
            detail = f"{len(names)} {what}(s) hold NaN/Inf: {names[:5]}"
            ops = _ops_run(trace, owner)
            if what == "parameter gradient" and loss is not None and math.isfinite(loss) and \
                    not bad.get("gradients") and ops:
                return what, owner, (
                    f"{detail}, while the loss and every observed gradient are finite: the "
                    f"backward of {owner or 'the model'}'s own forward, which ran "
                    f"{_op_names(ops)}, made it"), True
            return what, owner, detail
    return None


def _within(name: str, module: str) -> bool:
    """Whether ``name`` is ``module`` or a module inside it (the model's own forward: ``""``
    only)."""
    return name == module or (bool(module) and name.startswith(module + "."))


def _ops_run(trace: RunTrace, module: str) -> list:
    """The ops that can make NaN/Inf that the forward of ``module`` or of a module inside it
    ran (``RunTrace.module_ops``, ``RunTrace.op_sites``), fills with ±inf among them."""
    found = {via[-1] for (_, via), site in trace.op_sites.items()
             if site is not None and _within(site, module)}
    for name, ops in trace.module_ops.items():
        if _within(name, module):
            found.update(ops)
    return sorted(found, key=lambda op: (not inf_fill(op), op))


def _inf_filled(trace: RunTrace, module: str) -> bool:
    """Whether a fill with ±inf ran in the forward of ``module``, a module inside it or one
    around it (a scorer's ``masked_fill(mask, -inf)`` before its parent's softmax)."""
    return any(any(inf_fill(op) for op in ops) and (_within(name, module) or _within(module, name)
                                                      or not name)
               for name, ops in trace.module_ops.items())


def _op_names(ops: list) -> str:
    """``ops`` as text: a fill with -inf as ``masked_fill with -inf``."""
    return ", ".join(f"{op.split('(')[0]} with {op.split('(')[1][:-1]}" if inf_fill(op) else op
                     for op in ops)


# What makes each op that can make NaN/Inf safe (``_op_advice``), in this order.
_OP_ADVICE = (
    (("log", "log2", "log10", "log_", "log1p", "xlogy", "lgamma", "digamma"),
     "clamp the input of log (torch.log(x.clamp_min(1e-12)); noise u in [0, 1] before "
     "log(-log(u)): u.clamp(1e-6, 1 - 1e-6))"),
    (("exp", "exp_", "exp2", "expm1"),
     "clamp the input of exp (torch.exp(x.clamp_max(80))) or stay in log space "
     "(torch.logsumexp, F.softplus, F.log_softmax)"),
    (("sqrt", "sqrt_", "rsqrt", "rsqrt_"), "add eps inside sqrt (torch.sqrt(s + 1e-12))"),
    (("div", "div_", "true_divide", "__truediv__", "__rtruediv__", "__itruediv__",
      "reciprocal", "reciprocal_", "fmod", "remainder"),
     "add eps to denominators that can be 0 (a norm, a std, a count of unmasked items)"),
    (("pow", "pow_", "__pow__", "__rpow__"), "clamp the base of fractional powers "
     "(x.clamp_min(1e-12) ** p)"),
    (("acos", "asin", "atanh", "acosh", "tan", "erfinv"),
     "clamp the input of acos/asin (x.clamp(-1 + 1e-7, 1 - 1e-7))"),
)


def _op_advice(ops: list) -> str:
    """What makes ``ops`` safe, as text (a fill with -inf first)."""
    found = []
    if any(inf_fill(op) for op in ops):
        found.append("fill with torch.finfo(dtype).min instead of -inf (0 * -inf, a mask "
                     "times the filled tensor or a mean over it, is NaN, as is a softmax over a "
                     "row all -inf)")
    found += [text for names, text in _OP_ADVICE if set(names).intersection(ops)]
    return "; ".join(found)


def _infinite_batch(trace: RunTrace, names: list, acts: list) -> Optional[tuple]:
    """The data's fault when a batch tensor held ±Inf: a target (no layer output holds
    NaN/Inf), or a model input that the first layer output holding NaN/Inf takes as it is
    (an input's -inf elsewhere is a mask's, no fault). None otherwise."""
    first = min(acts, key=lambda lt: lt.depth) if acts else None
    for name in names:
        if name.startswith("targets"):
            if first is None:
                return "input", "", f"the batch holds Inf before the model runs ({name})"
            continue
        if first is not None and any(
                dst in (("module", first.module), first.node) and only_shape_ops(via, joins=True)
                for dst, via in downstream(trace, ("input", name))):
            return "input", "", (f"the batch holds Inf before the model runs ({name}), and "
                                 f"{first.label} ({first.type}) takes it as it is")
    return None


def _loss_raised(trace: RunTrace, step: dict) -> Optional[str]:
    """What the loss function raised at this step on model outputs holding NaN/Inf (which
    stopped a check), or None."""
    return next((e["message"] for e in trace.errors if e.get("kind") == "nonfinite-outputs"
                 and e.get("step") == step["step"]), None)


def _risky(via: tuple) -> str:
    """The ops of ``via`` that can make NaN/Inf, as text."""
    return ", ".join(op for op in via if op in RISKY_OPS)


def _risky_site(trace: RunTrace, edges: list) -> Optional[str]:
    """The one module whose forward the probe saw run the ops that can make NaN/Inf on
    ``edges`` (``RunTrace.op_sites``); None where none or several did (a safe division in one
    module and a log in the next do not tell which made it)."""
    sites = {trace.op_sites.get((edge.src, edge.via[:i + 1]))
             for edge in edges for i, op in enumerate(edge.via) if op in RISKY_OPS}
    return sites.pop() if len(sites) == 1 else None


def _made_on_the_way(trace: RunTrace, first: LayerTrace, bad: dict) -> Optional[tuple]:
    """When the first non-finite output's input came from a finite output through ops that
    can make NaN/Inf (``torch.log`` between two layers), those ops made it: in the forward of
    the module the probe saw the first of them run in (``RunTrace.op_sites``), else of the
    modules' common parent. ``(what, module, detail)`` or None."""
    by_node = {lt.node: lt for lt in trace.layers}
    for edge in trace.edges:
        if edge.dst not in (("module", first.module), first.node) or \
                not RISKY_OPS.intersection(edge.via):
            continue
        if edge.src[0] == "input":  # the batch held no NaN (TL504 says so before it gets here)
            return _made_from_the_input(trace, first, edge)
        src = by_node.get(edge.src)
        if src is None or src.node[1:] in bad:
            continue
        parent = _risky_site(trace, [edge])
        if parent is None:
            parent = _ran_in(first, src.module)
        ops = _risky(edge.via)
        return "forward", parent, (
            f"the output of {first.label} ({first.type}) holds NaN/Inf, and its input comes "
            f"from {src.label}, which is finite, through {ops} in the forward of "
            f"{parent or 'the model'}: those ops made it")
    return None


def _ran_in(first: LayerTrace, src_module: str) -> str:
    """The module whose forward ran the ops from ``src_module``'s output to ``first``: a leaf
    module's input comes from its parent's forward, a functional activation's from the
    forward of the module that called it."""
    return next(name for name in ancestors(first.module)
                if (name != first.module or first.op != "output") and (
                    not name or src_module == name or src_module.startswith(name + ".")))


def _fed_nonfinite(trace: RunTrace, first: LayerTrace, bad: dict) -> Optional[tuple]:
    """When every value of the first non-finite output is NaN/Inf and it is a weight layer's
    (its weights were finite: TL504 says so before it gets here), what it was fed held them
    already: made by the ops between a finite output and it, in their common parent's
    forward (where a second operand's ops, ``mu + exp(logvar) * eps``, are not traced).
    ``(what, module, detail)`` or None."""
    facts = trace.modules.get(first.module)
    if (first.op != "output" or facts is None or facts.base not in WEIGHT_LAYERS
            or not first.shape or bad[first.node[1:]] < math.prod(first.shape)):
        return None
    if blown_up(trace):  # weights out of range overflow what they take in
        return None
    by_node = {lt.node: lt for lt in trace.layers}
    for edge in trace.edges:
        src = by_node.get(edge.src)
        if (edge.dst != ("module", first.module) or src is None or src.node[1:] in bad
                or SHAPE_OPS.issuperset(edge.via)):  # fed a finite output as it is: overflow
            continue
        parent = _ran_in(first, src.module)
        ops = f" ({', '.join(edge.via)})" if edge.via else ""
        return "forward", parent, (
            f"every value of the output of {first.label} ({first.type}) is NaN/Inf while its "
            f"weights are finite: what it was fed held NaN/Inf already; it comes from "
            f"{src.label}, which is finite, through ops{ops} in the forward of "
            f"{parent or 'the model'}: one of them, or an operand they took in, made it")
    return None


# A float32 product overflows only where a factor is near the square root of its range
# (3.4e38): a weight layer's own weights above this norm can overflow it alone (TL504).
OVERFLOW_NORM = 1.8e19
# Modules whose forward passes what it takes on to a child as it is, or that have none.
CONTAINERS = frozenset({"Sequential", "ModuleList", "ModuleDict"})


def blown_up(trace: RunTrace) -> bool:
    """Whether a weight of the model blew up: its norm before an observed step past
    ``INFLATED`` x its first one and its RMS above 1 (a layer scale that grows from 1e-6 by
    design is no blow-up; SGD at lr 50 took weights from ~0.5 to ~1e23 an element)."""
    for p in trace.params:
        norms = [n for n in p.norms_before if math.isfinite(n)]
        size = math.prod(p.shape) or 1
        if norms and norms[0] > 0 and max(norms) > INFLATED * norms[0] and \
                max(norms) / math.sqrt(size) > 1:
            return True
    return False


def _fed_untraced(trace: RunTrace, first: LayerTrace, step_bad: dict) -> Optional[tuple]:
    """When the first non-finite output is a weight layer's and no observed tensor feeds it
    (no layer output or model input reaches it: its input was built in a forward from tensors
    the data-flow graph does not follow, a timestep embedding ``log(t) * freqs``), while no
    weight of the model blew up (:func:`blown_up`; its own not near ``OVERFLOW_NORM``, not in
    float16: an overflow needs values out of range), the code that built its input made the
    NaN/Inf: in the forward of the module where the graph saw the ops that can make it run on
    the paths it lost (``RunTrace.op_sites``), else of the innermost module around it that is
    not a container; or, where such a path starts at a model input that held ±Inf, the batch.
    ``(what, module, detail)`` or None."""
    facts = trace.modules.get(first.module)
    if first.op != "output" or facts is None or facts.base not in WEIGHT_LAYERS:
        return None
    if not trace.edges or any(edge.dst in (("module", first.module), first.node)
                              for edge in trace.edges):
        return None  # (no edges at all: no data-flow graph was recorded)
    own = [p for p in trace.params if p.module == first.module]
    if trace.amp_dtype == "float16" or any(p.dtype == "float16" for p in own) or any(
            n > OVERFLOW_NORM for p in own for n in [p.norm, *p.norms_before]) or \
            blown_up(trace):
        return None  # float16's range, or weights large enough to overflow float32
    # Paths the graph lost at an op with an untraced operand, after ops that can make NaN/Inf.
    lost = [edge for edge in trace.edges
            if edge.dst[0] == "op" and RISKY_OPS.intersection(edge.via)]
    infinite = step_bad.get("infinite_inputs") or []
    for edge in trace.edges:  # a path from an input that held ±Inf, lost on the way
        if edge.src[0] == "input" and edge.src[1] in infinite and edge.dst[0] == "op":
            return "input", "", (
                f"the batch holds Inf before the model runs ({edge.src[1]}), and the input of "
                f"{first.label} ({first.type}) is built from it in the forward")
    parent = _risky_site(trace, lost)
    if parent is None:
        parent = next((name for name in ancestors(first.module) if name != first.module and (
            name not in trace.modules or trace.modules[name].base not in CONTAINERS)), "")
    whose = trace.modules[parent].type if parent in trace.modules else "the model"
    seen = sorted({f"{_risky(edge.via)} on "
                   f"{edge.src[1] if edge.src[0] == 'input' else edge.src[1] + ' output'}"
                   for edge in lost})
    traced = f" (traced on the way: {'; '.join(seen)})" if seen else ""
    return "forward", parent, (
        f"the output of {first.label} ({first.type}) holds "
        f"{step_bad['activations'][first.node[1:]]} NaN/Inf value(s) while its weights are "
        f"finite and none of the model's grew out of range; no observed layer output or model "
        f"input feeds it: its input was built in the forward of {parent or 'the model'} "
        f"({whose}) from tensors made there{traced}, and that code made the NaN/Inf")


def _made_from_the_input(trace: RunTrace, first: LayerTrace, edge: Edge) -> tuple:
    """The first non-finite output's input came from a model input without NaN through ops
    that can make NaN/Inf (a per-sample standardization dividing by a std of 0): they ran in
    the forward of the innermost module around ``first`` that took the input as it is."""
    name = edge.src[1]
    took = {e.dst[1] for e in trace.edges if e.src == edge.src and e.dst[0] == "module"
            and not RISKY_OPS.intersection(e.via)}
    parent = next((m for m in ancestors(first.module) if m != first.module and m in took), "")
    ops = _risky(edge.via)
    return "forward", parent, (
        f"the output of {first.label} ({first.type}) holds NaN/Inf, and its input comes from "
        f"the model's input {name}, which holds no NaN, through {ops} in the forward of "
        f"{parent or 'the model'}: those ops made it")


@rule("TL504", "nonfinite", "error")
def nonfinite(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """NaN or Inf in the loss, an activation, a gradient or a parameter.

    ## What it does
    The probe counts non-finite elements of every observed output, gradient and parameter on the
    device, and reads each input of the model and each output that a module's own code makes (a
    module with children, the model itself) in full. At the first observed step with any, this
    names where it appeared first: the input batch (in a check, its float targets too; an Inf in
    a model input when the first layer output holding NaN/Inf takes it as it is, not a mask's
    -inf that reaches attention scores through ops); else parameters that already held NaN/Inf
    when the step began (at the first training step: the model was built or loaded with them;
    later, it appeared at an unobserved step: a Monitor with ``every > 1``); else the first
    module in forward execution order whose output holds NaN/Inf, a module whose own code
    (``torch.log`` in its ``forward``) made it before any observed output held any (or the ops
    that fed that first output from a finite output or a model input: a ``log`` between two
    layers, a per-sample division by a std of 0 before the first layer, named with the module
    whose forward ran them); else the loss; else the first module in backward order whose output
    gradient does; else the parameters (gradients, then values after the optimizer step). In the
    backward, when a module that takes that first module's output has a finite output gradient
    (or none observed), its backward made the NaN/Inf, with a finite forward (sqrt of a sum of
    squares at 0: the derivative is infinite, times 0): the finding names that module (looking
    through activations whose output gradient is not read, modules or calls such as
    ``torch.relu`` in a block's forward; a weight layer fed through ops that cannot make NaN/Inf
    last, one that is not a weight layer first); where that first module's output is the
    model's and the loss is finite, the loss function's backward (a triplet loss's
    ``sqrt`` of a distance of 0). A step whose only NaN/Inf is in what the model returns (and
    the gradient there), with its loss, parameters and their gradients finite, is left alone:
    the loss left those values out (logits masked with -inf on padded rows whose labels it
    ignores). In a check, a loss function that raises on
    model outputs holding NaN/Inf (BCE's "all elements of input should be between 0 and 1") ends
    the run at that step, and the finding says what it raised.

    ## Why is this bad?
    One NaN spreads to every weight in the next update: training is already broken.

    ## Example
    ``torch.log(x)`` or ``x.sqrt()`` on values that can be negative or zero; a division by a
    variance that can be 0; a learning rate so high that the weights overflow.

    ## Fix
    Fix the named module's computation (clamp before log/sqrt/division, add an epsilon, use
    ``log_softmax``/``logsumexp`` instead of ``log(softmax)``); for a NaN made in a backward,
    add eps inside sqrt (or use ``torch.linalg.vector_norm``) and clamp the base of fractional
    powers; for parameters, lower the learning rate and clip gradients; in fp16, use a
    GradScaler or bf16. The fix names the ops that can make NaN/Inf which the named module's
    forward ran (on any tensor, traced or not: ``RunTrace.module_ops``) or the loss function
    ran on the outputs (``RunTrace.loss_ops``), with what makes each safe: a custom Poisson
    loss ``exp(rate)`` that an outlier batch took to inf is told ``exp(x.clamp_max(80))``; a
    masked mean over a ``masked_fill(pad, -inf)`` (0 * -inf: NaN for every padded sample,
    which eps in the denominator does not change) is told ``torch.finfo(dtype).min``, which
    made it finite. The attention-mask advice leads where a softmax's output holds the first
    NaN only when a fill with ±inf ran in or around the module, a model input held ±inf, or
    the module ran no such op: a Gumbel softmax's ``-log(-log(u))`` at u = 1 is told to clamp
    the input of log. A parameter gradient holding NaN while the loss and every observed
    gradient are finite was made in the backward of its module's own forward: at step 0 of
    ``torch.where(h > 0, torch.log(h), 0)`` with h = counts x a learned scale, lowering the
    learning rate and clipping (the old fix) spread the NaN total norm to every parameter;
    the fix is the safe unselected branch, ``torch.log(h.clamp_min(1e-12))``. A loss that
    overflows after a weight blew up (SGD at lr 5: 4.7 -> 1.3e3 -> 4.7e11 by step 3; lr 0.01
    trains) is the learning rate's, as below. Where a weight blew up before the step (past
    ``INFLATED`` x its first norm, to an RMS above 1), NaN/Inf made in the forward after the
    first step is the learning rate's: the fix says so, also for a layer without weights (a
    GroupNorm fed values of 1e20).
    """
    for step in trace.per_step:
        if _masked_output_only(trace, step):
            continue
        found = _first_nonfinite(trace, step)
        if found is None:
            continue
        what, module, detail, *unsafe = found
        raised = _loss_raised(trace, step)
        if raised is not None:
            detail += f"; the loss function then raised {raised}"
        masked = (what == "forward" and trace.amp_dtype != "float16"  # (not an overflow)
                  and _softmax_first(trace, step) and _mask_possible(trace, module, step))
        yield Hit(
            module=module,
            message=f"NaN/Inf first appears at step {step['step']} in the {what}: {detail}",
            fix=_nonfinite_fix(what, module, trace, any(unsafe),
                               first=trace.at_start(step), masked=masked, step=step["step"]),
            evidence={"step": step["step"], "where": what},
        )
        return


def _masked_output_only(trace: RunTrace, step: dict) -> bool:
    """Whether the step's only NaN/Inf sat in what the model returns (and in the gradient at
    it), while its loss, every parameter and every parameter's gradient stayed finite: the
    loss left those values out (logits masked with -inf on padded rows whose labels it
    ignores; the mask's backward zeroes their gradient), so nothing was spoiled."""
    bad = step.get("nonfinite") or {}
    loss = step.get("loss")
    if not bad.get("activations") or loss is None or not math.isfinite(loss):
        return False
    if any(value for key, value in bad.items() if key not in ("activations", "gradients")):
        return False
    if not set(bad.get("gradients") or ()) <= set(bad["activations"]):
        return False
    by_key = {lt.node[1:]: lt for lt in trace.layers}
    return all(key in by_key and is_model_output(trace, by_key[key])
               for key in bad["activations"])


def _softmax_first(trace: RunTrace, step: dict) -> bool:
    """Whether the first output holding NaN/Inf at ``step`` is a softmax's: of finite inputs
    it is finite, so its NaN comes from a row whose inputs are all -inf (a fully masked row)."""
    bad = (step.get("nonfinite") or {}).get("activations") or {}
    acts = [lt for lt in trace.layers if lt.node[1:] in bad]
    return bool(acts) and min(acts, key=lambda lt: lt.depth).kind in ("softmax", "log_softmax")


def _mask_possible(trace: RunTrace, module: str, step: dict) -> bool:
    """Whether a mask's -inf can be what a softmax's NaN came from: a fill with ±inf ran in or
    around ``module``, a model input held ±inf (an additive mask), or the forward of
    ``module`` ran no op that can make NaN/Inf itself (a Gumbel noise's ``log(-log(u))`` at
    u = 1 is +inf: no mask there)."""
    return (_inf_filled(trace, module) or bool((step.get("nonfinite") or {}).get(
        "infinite_inputs")) or not _ops_run(trace, module))


def _nonfinite_fix(what: str, module: str, trace: RunTrace, unsafe: bool = False,
                   first: bool = False, masked: bool = False,
                   step: Optional[int] = None) -> str:
    """The fix for NaN/Inf first made by ``what`` in ``module`` (``first``: at step 0, before
    any update; ``masked``: the first output holding it is a softmax's)."""
    facts = trace.modules.get(module)
    ops = _ops_run(trace, module) if what != "loss" else []
    if unsafe:
        ran = f"; its forward ran {_op_names(ops)}" if ops else ""
        if {"log", "log2", "log10", "log1p"}.intersection(ops):
            ran += (": torch.where(x > 0, torch.log(x), 0) still sends the unselected branch "
                    "log's infinite derivative at 0 (0 * inf = NaN), so make that branch's "
                    "input safe, torch.where(x > 0, torch.log(x.clamp_min(1e-12)), 0)")
        return (f"make the backward of {repr(module) if module else 'the loss function'} safe "
                f"(its forward can be finite while its gradient is not{ran}): "
                "sqrt of a sum of squares that can be 0 has an infinite "
                "derivative there (add eps inside the sqrt: torch.sqrt(s + 1e-12), or use "
                "torch.linalg.vector_norm, whose gradient at 0 is 0), as has x ** p with "
                "0 < p < 1 at 0 (x.clamp_min(eps) ** p), and acos/asin at ±1 (a cosine "
                "similarity of 1: clamp their input to [-1 + 1e-7, 1 - 1e-7]); add eps to "
                "denominators that can be 0; "
                "with torch.where, make the unused branch's input safe too")
    weights = what in ("forward", "backward") and facts is not None and \
        facts.base in WEIGHT_LAYERS
    if weights and any(p.module == module and p.dtype == "float16" for p in trace.params):
        return (f"{module!r} overflowed float16's range (65504): its weights are float16 "
                "(model.half()); keep the weights in float32 and run the forward under "
                "torch.autocast(..., dtype=torch.bfloat16) (or float16 with "
                "torch.amp.GradScaler), or bring its weights or inputs to a smaller scale "
                "(TL301, TL201, TL104)")
    if weights and trace.amp_dtype == "float16":
        return (f"{module!r} overflowed float16's range (65504) under autocast: run it in "
                "bfloat16 (torch.autocast(..., dtype=torch.bfloat16)) or in float32 "
                "(torch.autocast(..., enabled=False) around it), or bring its weights or "
                "inputs to a smaller scale (TL301, TL201, TL104)")
    if weights and first:
        return (f"{module!r} overflowed at the first step, before any update: its weights or "
                "inputs are out of range from the start (the init or the data: TL301, TL201, "
                "TL104); use Kaiming/Xavier init and normalize the inputs")
    outlier = outlier_batch(trace) if weights and step is not None else None
    if outlier is not None and outlier[0] <= step:
        return (f"{module!r} overflowed after the batch of step {outlier[0]}, which holds "
                f"values up to {outlier[2]:.3g} in {outlier[1]!r} (TL502): drop that bad "
                "sample (or clip the data in the input pipeline), and clip gradients "
                "(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0))")
    if weights:
        return (f"{module!r} overflowed: its weights or inputs grew out of range (check the "
                "steps before: TL502, TL503, TL104); lower the learning rate, clip gradients "
                "(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)), and use "
                "Kaiming/Xavier init")
    if what == "forward" and trace.amp_dtype == "float16":
        return (f"under float16 autocast the values computed in {module or 'the model'!r} can "
                "overflow float16's range (65504): attention scores q·kᵀ or a product of large "
                "weights or inputs; run it in bfloat16 (torch.autocast(..., "
                "dtype=torch.bfloat16)) or in float32 (torch.autocast(..., enabled=False) "
                "around it), or bring the weights or inputs feeding it to a smaller scale "
                "(TL301, TL201, TL104); where it takes a mask, keep at least one key per "
                "query")
    if masked or (what == "forward" and facts is not None and attends(facts)):
        return (f"check the attention mask of {module or 'the model'!r}: a query whose keys "
                "are all masked (a sample that is all padding in key_padding_mask, a -inf mask "
                "row) gets a softmax over nothing, NaN; keep at least one key per query (drop "
                "empty samples) or mask with torch.finfo(dtype).min instead of -inf; and clamp "
                "inputs of log/sqrt/division in it")
    if not first and blown_up(trace) and (what == "loss" or (
            what == "forward" and facts is not None and facts.is_leaf)):
        # (a leaf without weights: a norm or an activation fed 1e20; a loss of outputs of 1e20)
        return (f"the weights grew out of range before "
                f"{'the loss' if what == 'loss' else repr(module or 'the model')} made it (one "
                "grew past 10x its first norm to an RMS above 1): lower the learning rate, "
                "clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), "
                "max_norm=1.0)); check the steps before (TL502, TL503)")
    if what in ("forward", "backward") and ops:
        return (f"make the computation in {module or 'the model'!r} safe: its forward ran "
                f"{_op_names(ops)}: {_op_advice(ops)}; elsewhere in it, clamp inputs of "
                "log/sqrt/pow/exp/division and use F.log_softmax/torch.logsumexp instead of "
                "log(softmax(x))")
    if what in ("forward", "backward"):
        return (f"make the computation in {module or 'the model'!r} safe: clamp inputs of "
                "log/sqrt/pow/exp/division (x.clamp_min(eps); exp(x.clamp_max(80))) and of "
                "acos/asin (x.clamp(-1 + 1e-7, 1 - 1e-7)), add eps to denominators that can be "
                "0 (a norm, a std, a count of positives in a batch), use "
                "F.log_softmax/torch.logsumexp instead of log(softmax(x))")
    if what == "input":
        return ("clean the data before the model: find the samples with NaN/Inf "
                "(torch.isfinite(x).all(dim=...)), drop or impute them (torch.nan_to_num), and "
                "check the preprocessing (a division by a zero std, a log of 0)")
    if what == "initial parameters":
        return ("find where they came from: the init code or the checkpoint loaded "
                "([n for n, p in model.named_parameters() if not p.isfinite().all()] lists "
                "them); re-initialize or reload those parameters before training")
    if what == "stale parameter":
        return ("observe every step (trainlint.Monitor(every=1), or trainlint check) to find "
                "where NaN/Inf first appears; meanwhile lower the learning rate and clip "
                "gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0))")
    if what == "loss" and trace.loss_ops:
        return (f"make the loss safe: the loss function ran {', '.join(trace.loss_ops)} on the "
                f"model's outputs: {_op_advice(list(trace.loss_ops))}; use "
                "nn.CrossEntropyLoss/BCEWithLogitsLoss on logits rather than log of "
                "probabilities, and check the targets' range")
    if what == "loss":
        return ("make the loss safe: use nn.CrossEntropyLoss/BCEWithLogitsLoss on logits "
                "rather than log of probabilities, clamp inside log, check the targets' range")
    return ("lower the learning rate and clip gradients "
            "(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)); in float16 "
            "use torch.amp.GradScaler or bfloat16")
