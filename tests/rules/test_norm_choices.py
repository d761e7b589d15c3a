"""TL402, TL403, TL405, TL406 (normalization choices) on hand-built traces."""

from __future__ import annotations

from tests.rules.tracekit import edge, hits, inputs, module, param, point, to_module, trace


def _bn(name="bn", type_="BatchNorm1d", shapes=((32, 16, 20),), **attrs):
    facts = module(name, type_, num_features=16, affine=True, **attrs)
    facts.input_shapes = [tuple(s) for s in shapes]
    facts.batch_sizes = [s[0] for s in shapes]
    return facts


def test_tl402_batchnorm_over_time_in_a_sequence_model_fires():
    t = trace([point("bn", "BatchNorm1d")],
              modules=[_bn(), module("embed", "Embedding"), module("rnn", "LSTM")], batch_size=32)
    found = hits("TL402", t)
    assert [h.module for h in found] == ["bn"]
    assert "nn.LayerNorm(16)" in found[0].fix


def test_tl402_flattened_tokens_count_as_time():
    t = trace([], modules=[_bn(shapes=((32 * 20, 16),)), module("attn", "MultiheadAttention")],
              batch_size=32)
    assert len(hits("TL402", t)) == 1


def test_tl402_leaves_batchnorm_on_an_images_patch_tokens_alone():
    """LeViT: Linear + BatchNorm1d over (N * 64, C) patch tokens around attention; the tokens
    are an image's fixed 8x8 grid. The same over tokens of a text model still fires."""
    image = inputs("input0", (32, 3, 32, 32), [0.0] * 3, [1.0] * 3, channel_dim=1)
    tokens = _bn(shapes=((32 * 64, 16),))
    vit = trace([], modules=[tokens, module("attn", "MultiheadAttention")], batch_size=32,
                inputs=[image], edges=[edge(("input", "input0"), ("module", "patch"))])
    assert hits("TL402", vit) == []
    masked = trace([], modules=[tokens, module("attn", "MultiheadAttention")], batch_size=32,
                   inputs=[image], edges=[edge(("input", "input0"), ("module", "patch")),
                                          edge(("input", "mask"), ("module", "attn"))])
    assert len(hits("TL402", masked)) == 1, "an integer input (a padding mask): a sequence"
    text = trace([], modules=[tokens, module("attn", "MultiheadAttention"),
                              module("embed", "Embedding")], batch_size=32, inputs=[image])
    assert len(hits("TL402", text)) == 1
    series = inputs("input0", (32, 64, 16), [0.0] * 16, [1.0] * 16)
    assert len(hits("TL402", trace([], modules=[tokens, module("attn", "MultiheadAttention")],
                                   batch_size=32, inputs=[series]))) == 1


def test_tl402_leaves_batchnorm_on_a_convolutions_output_alone():
    """VDCNN: Embedding -> Conv1d -> BatchNorm1d over (N, C, L) conv maps, the paper's design;
    the same BatchNorm on the embeddings themselves (transposed) still fires."""
    embed, conv = point("embed", "Embedding"), point("conv", "Conv1d")
    for src, fires in ((conv, False), (embed, True)):
        t = trace([embed, conv, point("bn", "BatchNorm1d")],
                  modules=[_bn(), module("embed", "Embedding"), module("conv", "Conv1d")],
                  batch_size=32, edges=[to_module(embed, "conv", ("transpose",)),
                                        to_module(src, "bn", ("transpose",))])
        assert bool(hits("TL402", t)) is fires, src.module
    through_pool = trace([conv, point("pool", "MaxPool1d"), point("bn", "BatchNorm1d")],
                         modules=[_bn(), module("embed", "Embedding"), module("conv", "Conv1d"),
                                  module("pool", "MaxPool1d")], batch_size=32,
                         edges=[to_module(conv, "pool"),
                                to_module(point("pool", "MaxPool1d"), "bn")])
    assert hits("TL402", through_pool) == []


def _tcn(inner_ops, *, between=("Conv1d",), bias=False):
    """Embedding -> Conv1d -> (a user's ``Chomp1d`` with ``inner_ops``) -> ... -> BatchNorm1d."""
    embed, conv = point("embed", "Embedding"), point("conv", "Conv1d")
    chomp = point("chomp", "Chomp1d")
    chomp_facts = module("chomp", "Chomp1d")
    if inner_ops is not None:
        chomp_facts.attrs["inner_ops"] = list(inner_ops)
    return trace([embed, conv, chomp, point("bn", "BatchNorm1d")],
                 modules=[_bn(), module("embed", "Embedding"),
                          module("conv", "Conv1d", has_bias=bias), chomp_facts],
                 batch_size=32, edges=[to_module(embed, "conv", ("transpose",)),
                                       to_module(conv, "chomp"), to_module(chomp, "bn")])


def test_tl402_looks_through_a_users_module_that_only_slices_a_convs_output():
    """A causal TCN: Conv1d -> Chomp1d (``x[:, :, :-n].contiguous()``) -> BatchNorm1d. The
    BatchNorm normalizes conv maps; a module that computes, or whose ops the probe did not
    see, is no pass-through."""
    assert hits("TL402", _tcn(("__getitem__", "contiguous"))) == []
    assert hits("TL402", _tcn(())) == []  # returns its input as it is
    for ops in (("cumsum",), ("__getitem__", "mul"), None):
        assert len(hits("TL402", _tcn(ops))) == 1, ops


def test_tl403_looks_through_a_users_module_that_only_slices_the_output():
    found = hits("TL403", _tcn(("__getitem__", "contiguous"), bias=True))
    assert [h.module for h in found] == ["conv"] and "'bn'" in found[0].message
    assert hits("TL403", _tcn(("__getitem__", "mul"), bias=True)) == []
    assert hits("TL403", _tcn(None, bias=True)) == []
    also_elsewhere = _tcn(("__getitem__",), bias=True)
    also_elsewhere.edges.append(to_module(point("chomp", "Chomp1d"), "head", ("add",)))
    also_elsewhere.modules["head"] = module("head", "Linear")
    assert hits("TL403", also_elsewhere) == []


def test_tl402_conv_then_activation_then_batchnorm_normalizes_conv_maps():
    """Conv1d -> ReLU -> BatchNorm1d (module or functional ReLU) is still BatchNorm over a
    conv's maps; an activation of the embeddings is not."""
    embed, conv = point("embed", "Embedding"), point("conv", "Conv1d")
    modules = [_bn(), module("embed", "Embedding"), module("conv", "Conv1d"),
               module("act", "ReLU"), module("block", "Block", leaf=False)]
    for src, fires in ((conv, False), (embed, True)):
        relu = point("act", "ReLU", kind="relu")
        t = trace([embed, conv, relu, point("bn", "BatchNorm1d")], modules=modules,
                  batch_size=32, edges=[to_module(embed, "conv", ("transpose",)),
                                        to_module(src, "act", ("transpose",)),
                                        to_module(relu, "bn")])
        assert bool(hits("TL402", t)) is fires, src.module
        functional = point("block", "Block", op="relu", kind="relu")
        t = trace([embed, conv, functional, point("bn", "BatchNorm1d")], modules=modules,
                  batch_size=32, edges=[to_module(embed, "conv", ("transpose",)),
                                        edge(src.node, functional.node, ("transpose",)),
                                        to_module(functional, "bn")])
        assert bool(hits("TL402", t)) is fires, ("functional", src.module)
    unknown = point("act", "ReLU", kind="relu")  # an activation with no edge in
    t = trace([unknown, point("bn", "BatchNorm1d")], modules=modules, batch_size=32,
              edges=[to_module(unknown, "bn")])
    assert len(hits("TL402", t)) == 1


def test_tl402_a_module_calling_scaled_dot_product_attention_is_attention():
    mixer = module("blocks.0.mixer", "TokenMixer")  # any name
    assert hits("TL402", trace([], modules=[_bn(), mixer], batch_size=32)) == []
    mixer.attrs["attends"] = True  # its forward called F.scaled_dot_product_attention
    found = hits("TL402", trace([], modules=[_bn(), mixer], batch_size=32))
    assert [h.module for h in found] == ["bn"] and "TokenMixer" in found[0].message


def test_tl402_feature_batchnorm_in_a_sequence_model_is_fine():
    t = trace([], modules=[_bn(shapes=((32, 16),)), module("embed", "Embedding")], batch_size=32)
    assert hits("TL402", t) == []


def test_tl402_needs_a_sequence_model():
    assert hits("TL402", trace([], modules=[_bn(), module("conv", "Conv1d")], batch_size=32)) == []
    images = _bn(type_="BatchNorm2d", shapes=((32, 16, 8, 8),))
    assert hits("TL402", trace([], modules=[images, module("rnn", "GRU")], batch_size=32)) == []


def _conv_into(norm_facts, *, bias=True, via=()):
    conv = point("conv", "Conv2d")
    return trace([conv], modules=[module("conv", "Conv2d", has_bias=bias), norm_facts],
                 edges=[to_module(conv, norm_facts.name, via)])


def test_tl403_bias_into_batchnorm_fires():
    found = hits("TL403", _conv_into(_bn(type_="BatchNorm2d")))
    assert [h.module for h in found] == ["conv"]
    assert "bias=False" in found[0].fix


def test_tl403_no_bias_or_layernorm_is_fine():
    assert hits("TL403", _conv_into(_bn(type_="BatchNorm2d"), bias=False)) == []
    assert hits("TL403", _conv_into(module("ln", "LayerNorm"))) == []


def test_tl403_one_bias_value_per_channel_of_the_norm():
    """DCGAN's generator stem: Linear(100, 64 * 16) -> view(-1, 64, 4, 4) -> BatchNorm2d(64).
    The norm removes each channel's mean bias, not the spread of its 16 values: not cancelled.
    A conv's 16 biases into BatchNorm2d(16) are."""
    norm = _bn(type_="BatchNorm2d")  # num_features=16
    for biases, fires in ((16, True), (16 * 16, False), (8, False)):
        t = _conv_into(norm, via=("view",))
        t.params = [param("conv.bias", (biases,))]
        assert bool(hits("TL403", t)) is fires, biases


def test_tl403_groupnorm_cancels_the_bias_only_with_one_channel_per_group():
    per_channel = module("gn", "GroupNorm", num_groups=16, num_channels=16, affine=True)
    grouped = module("gn", "GroupNorm", num_groups=4, num_channels=16, affine=True)
    assert len(hits("TL403", _conv_into(per_channel))) == 1
    assert hits("TL403", _conv_into(grouped)) == []


def test_tl403_recurrent_biases_sit_inside_the_gates():
    for type_ in ("LSTM", "GRU", "RNN"):
        rnn = point("rnn", type_)
        t = trace([rnn], modules=[module("rnn", type_, has_bias=True), _bn()],
                  edges=[to_module(rnn, "bn", ("__getitem__",))])
        assert hits("TL403", t) == [], type_


def test_tl403_output_also_used_elsewhere_keeps_its_bias():
    conv = point("conv", "Conv2d")
    norm, head = _bn(type_="BatchNorm2d"), module("head", "Linear")
    into_norm = [to_module(conv, "bn"), to_module(conv, "block")]
    block = module("block", "Sequential", leaf=False)
    modules = [module("conv", "Conv2d", has_bias=True), norm, head, block]
    assert len(hits("TL403", trace([conv], modules=modules, edges=into_norm))) == 1
    residual = into_norm + [to_module(conv, "head", ("add", "mean"))]
    assert hits("TL403", trace([conv], modules=modules, edges=residual)) == []


def test_tl403_only_straight_into_the_norm():
    assert hits("TL403", _conv_into(_bn(type_="BatchNorm2d"), via=("add",))) == []
    assert hits("TL403", _conv_into(_bn(type_="BatchNorm2d"), via=("dropout",))) == []
    assert len(hits("TL403", _conv_into(module("inorm", "InstanceNorm2d"), via=("view",)))) == 1


def _image_model(out_shape, loss_kind="mse", norm="BatchNorm2d", output=None):
    out = point("out", "Conv2d", shape=out_shape, depth=3)
    image = inputs("input0", (4, 3, 16, 16), [0.0] * 3, [1.0] * 3, channel_dim=1)
    return trace([out], modules=[_bn(type_=norm, shapes=((4, 16, 16, 16),))], inputs=[image],
                 output_ops=(output or (out.node, ()),), loss_kind=loss_kind)


def test_tl405_a_residual_generator_is_an_image_to_image_model():
    """A denoiser returning x - net(x): the output comes from the input through a sub."""
    residual = (("input", "input0"), ("sub",))
    assert [h.module for h in hits("TL405", _image_model((4, 3, 16, 16), output=residual))] == [
        "bn"]
    out_plus = (("point", "out", "output", None), ("add",))
    assert hits("TL405", _image_model((4, 3, 16, 16), output=out_plus))
    pooled = (("point", "out", "output", None), ("mean",))
    assert hits("TL405", _image_model((4, 3, 16, 16), output=pooled)) == []


def test_tl405_batchnorm_in_an_image_to_image_model_fires():
    found = hits("TL405", _image_model((4, 3, 16, 16)))
    assert [h.module for h in found] == ["bn"]
    assert "nn.InstanceNorm2d(16, affine=True)" in found[0].fix


def test_tl405_segmentation_and_classifiers_are_fine():
    assert hits("TL405", _image_model((4, 3, 16, 16), loss_kind="cross_entropy")) == []
    assert hits("TL405", _image_model((4, 10))) == []
    assert hits("TL405", _image_model((4, 3, 32, 32))) == []
    assert hits("TL405", _image_model((4, 3, 16, 16), norm="InstanceNorm2d")) == []


def test_tl406_dropout_module_into_batchnorm_fires():
    drop = point("drop", "Dropout")
    t = trace([drop], modules=[module("drop", "Dropout", p=0.5), _bn()],
              edges=[to_module(drop, "bn")])
    assert [h.module for h in hits("TL406", t)] == ["drop"]


def test_tl406_functional_dropout_into_batchnorm_fires_at_the_batchnorm():
    fc = point("fc", "Linear")
    t = trace([fc], modules=[_bn()], edges=[to_module(fc, "bn", ("dropout", "view"))])
    assert [h.module for h in hits("TL406", t)] == ["bn"]


def test_tl406_dropout_elsewhere_or_disabled_is_fine():
    drop = point("drop", "Dropout")
    off = trace([drop], modules=[module("drop", "Dropout", p=0.0), _bn()],
                edges=[to_module(drop, "bn")])
    assert hits("TL406", off) == []
    fc = point("fc", "Linear")
    after = trace([fc, drop], modules=[module("drop", "Dropout", p=0.5), _bn()],
                  edges=[to_module(fc, "bn"), edge(("point", "bn", "output", None),
                                                   ("module", "drop"))])
    assert hits("TL406", after) == []
