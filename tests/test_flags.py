"""Tests for leafpass.flags: the eager ZeRO-3 leaf-flag API shared with DeepSpeed."""

import ast
import copy
import importlib
import inspect
import os
import pickle
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from leafpass.flags import (
    DEFAULT_LEAF_MODULE_CLASSES,
    DEFAULT_LEAF_MODULE_NAME_SUFFIXES,
    DEFAULT_LEAF_MODULE_NAMES,
    apply_leaf_module_config,
    get_z3_leaf_modules,
    set_z3_leaf_module,
    set_z3_leaf_modules,
    set_z3_leaf_modules_by_name,
    set_z3_leaf_modules_by_suffix,
    unset_z3_leaf_modules,
    z3_leaf_module,
    z3_leaf_parameter,
)

# --------------------------------------------------------------------------- toy model
# Module level so that pickle can find the classes.


class Expert(nn.Module):

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class MoEBlock(nn.Module):

    def __init__(self, n_experts=2):
        super().__init__()
        self.gate = nn.Linear(4, n_experts)
        self.experts = nn.ModuleList(Expert() for _ in range(n_experts))

    def forward(self, x):
        weights = torch.softmax(self.gate(x), dim=-1)
        return sum(weights[..., i:i + 1] * expert(x) for i, expert in enumerate(self.experts))


class SubMoEBlock(MoEBlock):
    pass


class Outer:

    class InnerBlock(nn.Module):

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)


class Layer(nn.Module):

    def __init__(self, block_cls):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.mlp = block_cls()

    def forward(self, x):
        return self.mlp(self.q_proj(x))


class ToyModel(nn.Module):

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(MoEBlock), Layer(SubMoEBlock), Layer(Outer.InnerBlock)])
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyModel()


def names_of(model, modules):
    by_id = {id(m): n for n, m in model.named_modules()}
    return [by_id[id(m)] for m in modules]


def post_order(module):
    """Independent reference for model.apply order: children first, then the module."""
    out = []
    for child in module.children():
        out.extend(post_order(child))
    out.append(module)
    return out


def flag_state(model):
    return {name: getattr(m, "_z3_leaf", None) for name, m in model.named_modules()}


# --------------------------------------------------------------------------- queries and singular setter


def test_z3_leaf_module_reads_flag(model):
    assert z3_leaf_module(model.norm) is False
    set_z3_leaf_module(model.norm, True)
    assert z3_leaf_module(model.norm) is True
    assert model.norm._z3_leaf is True
    set_z3_leaf_module(model.norm, False)
    assert z3_leaf_module(model.norm) is False
    assert hasattr(model.norm, "_z3_leaf")
    model.norm._z3_leaf = 1  # any truthy value written by someone else counts
    assert z3_leaf_module(model.norm) is True


def test_z3_leaf_parameter(model):
    param = model.norm.weight
    assert z3_leaf_parameter(param) is False
    param.ds_z3_leaf_module = model.norm  # what DeepSpeed's ZeRO-3 writes on parameters of leaves
    assert z3_leaf_parameter(param) is True
    assert z3_leaf_parameter(model.norm.bias) is False


def test_get_z3_leaf_modules_preorder_including_root(model):
    assert get_z3_leaf_modules(model) == []
    set_z3_leaf_module(model.norm, True)
    set_z3_leaf_module(model.layers[1].mlp, True)
    set_z3_leaf_module(model, True)
    set_z3_leaf_module(model.layers[0], False)
    assert names_of(model, get_z3_leaf_modules(model)) == ["", "layers.1.mlp", "norm"]


# --------------------------------------------------------------------------- set/unset by class


def test_set_by_type_matches_subclasses_in_apply_order(model):
    matched = set_z3_leaf_modules(model, [MoEBlock])
    assert names_of(model, matched) == ["layers.0.mlp", "layers.1.mlp"]
    assert all(z3_leaf_module(m) for m in matched)
    assert isinstance(matched[1], SubMoEBlock)
    assert not z3_leaf_module(model.layers[2].mlp)


def test_set_returns_post_order_children_first(model):
    # DeepSpeed walks with model.apply: children before their parent, unlike model.modules().
    matched = set_z3_leaf_modules(model, [nn.Module])
    assert matched == post_order(model)
    assert matched[-1] is model
    assert names_of(model, matched)[:3] == ["layers.0.q_proj", "layers.0.mlp.gate", "layers.0.mlp.experts.0.up"]
    # get_z3_leaf_modules keeps model.modules() (pre-order) order.
    assert get_z3_leaf_modules(model) == list(model.modules())


def test_shared_module_visited_twice_like_model_apply():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(nn.Sequential(shared), shared)
    matched = set_z3_leaf_modules(model, [nn.Linear])
    assert matched == [shared, shared]
    assert get_z3_leaf_modules(model) == [shared]


def test_set_by_bare_class_name_is_exact(model):
    matched = set_z3_leaf_modules(model, ["MoEBlock"])
    # A string names one class: the subclass SubMoEBlock is not matched.
    assert names_of(model, matched) == ["layers.0.mlp"]
    assert not z3_leaf_module(model.layers[1].mlp)


def test_set_by_qualified_name(model):
    matched = set_z3_leaf_modules(model, [f"{SubMoEBlock.__module__}.SubMoEBlock"])
    assert names_of(model, matched) == ["layers.1.mlp"]


def test_set_by_qualified_name_of_nested_class(model):
    qualified = f"{Outer.InnerBlock.__module__}.Outer.InnerBlock"
    assert names_of(model, set_z3_leaf_modules(model, [qualified])) == ["layers.2.mlp"]
    # The bare name of a nested class is its __name__, not its __qualname__.
    assert names_of(model, set_z3_leaf_modules(model, ["InnerBlock"])) == ["layers.2.mlp"]
    assert set_z3_leaf_modules(model, ["Outer.InnerBlock"], raise_if_not_found=False) == []


def test_set_mixed_entries_and_tuple(model):
    matched = set_z3_leaf_modules(model, ("LayerNorm", SubMoEBlock, "torch.nn.modules.linear.Linear"))
    names = names_of(model, matched)
    assert "norm" in names and "layers.1.mlp" in names and "layers.0.q_proj" in names
    assert "layers.0.mlp" not in names
    # each module appears once even if several entries match it
    assert len(matched) == len({id(m) for m in matched})
    assert set_z3_leaf_modules(model, [nn.Linear, "Linear"]) == [m for m in post_order(model) if type(m) is nn.Linear]


def test_set_matches_root(model):
    assert set_z3_leaf_modules(model, ["ToyModel"]) == [model]
    assert z3_leaf_module(model)


def test_unset(model):
    set_z3_leaf_modules(model, [MoEBlock, nn.LayerNorm])
    unset = unset_z3_leaf_modules(model, ["SubMoEBlock"])
    assert names_of(model, unset) == ["layers.1.mlp"]
    assert model.layers[1].mlp._z3_leaf is False
    assert names_of(model, get_z3_leaf_modules(model)) == ["layers.0.mlp", "norm"]
    assert unset_z3_leaf_modules(model, [nn.Conv2d], raise_if_not_found=False) == []


def test_unset_also_clears_flags_set_by_name(model):
    set_z3_leaf_modules_by_name(model, ["layers.0.mlp"])
    unset_z3_leaf_modules(model, [MoEBlock])
    assert get_z3_leaf_modules(model) == []


@pytest.mark.parametrize("fn", [set_z3_leaf_modules, unset_z3_leaf_modules])
def test_no_match_raises_value_error_naming_classes_and_model(model, fn):
    with pytest.raises(ValueError) as info:
        fn(model, ["Conv2d", nn.GRU])
    message = str(info.value)
    assert fn.__name__ in message
    assert "'Conv2d'" in message and "torch.nn.modules.rnn.GRU" in message
    assert "ToyModel" in message
    assert "raise_if_not_found=False" in message
    assert "qualified" in message
    assert "in_features" not in message  # not the model repr
    assert fn(model, ["Conv2d"], raise_if_not_found=False) == []


def test_no_match_suggests_close_class_names(model):
    with pytest.raises(ValueError, match=r"Did you mean \[.*'MoEBlock'.*\]"):
        set_z3_leaf_modules(model, ["MoEBlok"])


@pytest.mark.parametrize("fn", [set_z3_leaf_modules, unset_z3_leaf_modules])
@pytest.mark.parametrize(
    "classes, pattern",
    [
        (MoEBlock, r"leaf_module_classes must be a list or tuple, got MoEBlock of type type; wrap .* \[MoEBlock\]"),
        ("MoEBlock", r"leaf_module_classes must be a list or tuple, got 'MoEBlock' of type str; wrap .*\['MoEBlock'\]"),
        ({MoEBlock}, r"must be a list or tuple, got .* of type set"),
    ],
)
def test_classes_not_a_list_raises_type_error(model, fn, classes, pattern):
    with pytest.raises(TypeError, match=pattern):
        fn(model, classes)
    assert get_z3_leaf_modules(model) == []


@pytest.mark.parametrize("fn", [set_z3_leaf_modules, unset_z3_leaf_modules])
@pytest.mark.parametrize("entry, type_name", [(3, "int"), (None, "NoneType"), (nn.Linear(1, 1), "Linear")])
def test_bad_class_entry_raises_type_error(model, fn, entry, type_name):
    with pytest.raises(TypeError, match=rf"{fn.__name__}: leaf_module_classes\[1\] is .* of type {type_name}; "
                       r"each entry must be a module class .* or a class name string"):
        fn(model, ["LayerNorm", entry])
    assert get_z3_leaf_modules(model) == []


# --------------------------------------------------------------------------- by name / by suffix


def test_by_name(model):
    matched, missing = set_z3_leaf_modules_by_name(model, ["layers.1.mlp", "norm"])
    assert names_of(model, matched) == ["layers.1.mlp", "norm"]
    assert missing == []
    assert names_of(model, get_z3_leaf_modules(model)) == ["layers.1.mlp", "norm"]
    matched, missing = set_z3_leaf_modules_by_name(model, ["norm"], flag=False)
    assert matched == [model.norm] and model.norm._z3_leaf is False
    assert set_z3_leaf_modules_by_name(model, [""]) == ([model], [])


def test_by_name_missing_without_raise(model):
    matched, missing = set_z3_leaf_modules_by_name(model, ["nope", "layers.0.mlp", "layers.9"],
                                                   raise_if_not_found=False)
    assert names_of(model, matched) == ["layers.0.mlp"]
    assert missing == ["nope", "layers.9"]
    assert z3_leaf_module(model.layers[0].mlp)


def test_by_name_missing_raises_with_suggestion(model):
    with pytest.raises(ValueError) as info:
        set_z3_leaf_modules_by_name(model, ["layer.0.mlp", "norm", "zzzzzz"])
    message = str(info.value)
    assert "set_z3_leaf_modules_by_name" in message and "ToyModel" in message
    assert "'layer.0.mlp' (did you mean 'layers.0.mlp'" in message
    assert "'zzzzzz'" in message and "'norm'" not in message  # found names are not reported
    assert "raise_if_not_found=False" in message
    # like DeepSpeed, modules that were found are flagged before raising
    assert z3_leaf_module(model.norm)


def test_by_name_shared_module_only_first_name():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(nn.Sequential(shared), shared)
    # named_modules() lists a shared module once, under its first name only.
    assert set_z3_leaf_modules_by_name(model, ["0.0", "1"], raise_if_not_found=False) == ([shared], ["1"])


def test_by_suffix_dedupes(model):
    matched, missing = set_z3_leaf_modules_by_suffix(model, ["mlp", "layers.1.mlp", "nothing_here"],
                                                     raise_if_not_found=False)
    assert names_of(model, matched) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    assert missing == ["nothing_here"]


def test_by_suffix_is_plain_endswith(model):
    matched, _ = set_z3_leaf_modules_by_suffix(model, ["proj"])
    # "proj" matches "q_proj" and "mlp.proj": not a dotted-component match.
    assert names_of(model, matched) == [
        "layers.0.q_proj", "layers.1.q_proj", "layers.2.q_proj", "layers.2.mlp.proj"
    ]
    matched, _ = set_z3_leaf_modules_by_suffix(model, [""], flag=False)
    assert matched == list(model.modules())  # the empty suffix matches everything, root included
    assert get_z3_leaf_modules(model) == []


def test_by_suffix_missing_raises_with_suggestion(model):
    with pytest.raises(ValueError, match=r"set_z3_leaf_modules_by_suffix: no module of ToyModel has a name ending "
                       r"with 'mpl' \(did you mean 'mlp'.*raise_if_not_found=False"):
        set_z3_leaf_modules_by_suffix(model, ["mpl"])


@pytest.mark.parametrize("fn, argname", [(set_z3_leaf_modules_by_name, "module_names"),
                                         (set_z3_leaf_modules_by_suffix, "module_name_suffixes")])
def test_by_name_and_suffix_type_errors(model, fn, argname):
    with pytest.raises(TypeError, match=rf"{argname} must be a list or tuple, got 'norm' of type str; "
                       r"wrap .*\['norm'\]"):
        fn(model, "norm")
    with pytest.raises(TypeError, match=rf"{argname}\[0\] is 0 of type int; each entry must be a string"):
        fn(model, [0])


# --------------------------------------------------------------------------- apply_leaf_module_config


def test_defaults_constants():
    assert DEFAULT_LEAF_MODULE_CLASSES == (
        "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
        "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
    )
    assert DEFAULT_LEAF_MODULE_NAMES == () and DEFAULT_LEAF_MODULE_NAME_SUFFIXES == ()


@pytest.mark.parametrize("cfg", [None, {}, {"classes": list(DEFAULT_LEAF_MODULE_CLASSES)}])
def test_apply_defaults_on_toy_model_are_silent(model, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_leaf_module_config(model, cfg) == []
    assert get_z3_leaf_modules(model) == []


def test_apply_order_and_dedupe(model):
    cfg = {"classes": ["LayerNorm", "MoEBlock"], "names": ["layers.2.mlp", "norm"], "name_suffixes": ["1.mlp", "mlp"]}
    matched = apply_leaf_module_config(model, cfg)
    # classes (apply order), then names, then suffixes; each module once
    assert names_of(model, matched) == ["layers.0.mlp", "norm", "layers.2.mlp", "layers.1.mlp"]
    assert names_of(model, get_z3_leaf_modules(model)) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp", "norm"]


def test_apply_missing_keys_take_defaults(model):
    # names/suffixes default to empty: only the classes entry acts
    assert names_of(model, apply_leaf_module_config(model, {"classes": ["SubMoEBlock"]})) == ["layers.1.mlp"]
    # classes default to the HF classes, which the toy model lacks: only names act
    assert names_of(model, apply_leaf_module_config(model, {"names": ["norm"]})) == ["norm"]


def test_apply_coerces_strings_and_dedupes(model):
    cfg = {"classes": "LayerNorm", "names": ["norm", "norm"], "name_suffixes": "q_proj"}
    matched = apply_leaf_module_config(model, cfg)
    assert names_of(model, matched) == ["norm", "layers.0.q_proj", "layers.1.q_proj", "layers.2.q_proj"]


def test_apply_accepts_classes_as_types(model):
    assert names_of(model, apply_leaf_module_config(model, {"classes": [SubMoEBlock]})) == ["layers.1.mlp"]


def test_apply_accepts_object_with_attributes(model):
    cfg = types.SimpleNamespace(classes=[], names=["layers.0.mlp"], name_suffixes=("norm",))
    assert names_of(model, apply_leaf_module_config(model, cfg)) == ["layers.0.mlp", "norm"]


@pytest.mark.parametrize("cfg, unknown", [
    ({"zero_optimization": {"stage": 3}}, "'zero_optimization'"),
    ({"stage": 3, "classes": []}, "'stage'"),
    ({"class": ["MoEBlock"], "suffixes": []}, "'class', 'suffixes'"),
])
def test_apply_rejects_unknown_keys(model, cfg, unknown):
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \[{unknown}\] in the leaf module config; valid keys are "
                       r"\['classes', 'names', 'name_suffixes'\]"):
        apply_leaf_module_config(model, cfg)
    assert get_z3_leaf_modules(model) == []


def test_apply_whole_ds_config_hint(model):
    with pytest.raises(ValueError, match=r"not a whole DeepSpeed config: pass "
                       r"ds_config\['zero_optimization'\]\['leaf_module'\]"):
        apply_leaf_module_config(model, {"train_batch_size": 8, "zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=r"not the zero_optimization section: pass "
                       r"ds_config\['zero_optimization'\]\['leaf_module'\]"):
        apply_leaf_module_config(model, {"stage": 3, "leaf_module": {"names": ["norm"]}})


@pytest.mark.parametrize("cfg, pattern", [
    (3, r"cfg must be None, a mapping .* got int"),
    ({"classes": None}, r"'classes' must be a string or a list of strings, got None of type NoneType"),
    ({"names": ["norm", 3]}, r"names\[1\] is 3 of type int; each entry must be a string"),
    ({"name_suffixes": [nn.Linear]}, r"name_suffixes\[0\] is .* of type type; each entry must be a string"),
    ({"classes": [1.5]}, r"classes\[0\] is 1.5 of type float; each entry must be a class name string or a module"),
])
def test_apply_type_errors(model, cfg, pattern):
    with pytest.raises(TypeError, match=pattern):
        apply_leaf_module_config(model, cfg)


def test_apply_warns_for_unmatched_names_and_suffixes(model):
    with pytest.warns(UserWarning) as record:
        matched = apply_leaf_module_config(model, {"names": ["nope", "norm"], "name_suffixes": ["zz"]})
    assert names_of(model, matched) == ["norm"]
    messages = [str(w.message) for w in record]
    assert messages == [
        "ZeRO leaf module config: no module of ToyModel is named ['nope']",
        "ZeRO leaf module config: no module name of ToyModel ends with ['zz']",
    ]


def test_apply_warns_when_custom_config_matches_nothing(model):
    with pytest.warns(UserWarning, match=r"matched no module of ToyModel"):
        assert apply_leaf_module_config(model, {"classes": ["Conv2d"]}) == []
    # unmatched custom classes alone do not warn when something else matched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names_of(model, apply_leaf_module_config(model, {"classes": ["Conv2d", "LayerNorm"]})) == ["norm"]


# --------------------------------------------------------------------------- serialisation


def test_flagged_model_deepcopies_pickles_and_keeps_state_dict(model):
    keys_before = list(model.state_dict().keys())
    set_z3_leaf_modules(model, [MoEBlock, "LayerNorm"])
    assert list(model.state_dict().keys()) == keys_before
    expected = names_of(model, get_z3_leaf_modules(model))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert names_of(clone, get_z3_leaf_modules(clone)) == expected
        assert list(clone.state_dict().keys()) == keys_before
        clone.load_state_dict(model.state_dict())
        x = torch.randn(3, 4)
        torch.testing.assert_close(clone(x), model(x))


def test_flags_module_does_not_import_deepspeed():
    # deepspeed is optional: leafpass/flags.py must not import it, even lazily.
    import leafpass.flags as lf
    tree = ast.parse(Path(lf.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported and not any(name.split(".")[0] == "deepspeed" for name in imported), imported


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_mixtral():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                        num_experts_per_tok=2)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.transformers
@pytest.mark.parametrize("cfg", [{}, None])
def test_defaults_flag_real_mixtral_block(tiny_mixtral, cfg):
    model = copy.deepcopy(tiny_mixtral)
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    blocks = [m for m in model.modules() if isinstance(m, MixtralSparseMoeBlock)]
    assert len(blocks) == 1
    assert apply_leaf_module_config(model, cfg) == blocks
    assert get_z3_leaf_modules(model) == blocks
    assert names_of(model, blocks) == ["model.layers.0.mlp"]


# --------------------------------------------------------------------------- DeepSpeed interop


@pytest.fixture(scope="module")
def ds():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    utils = pytest.importorskip("deepspeed.utils")
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    from deepspeed.runtime.zero import leaf_module_config
    # deepspeed.utils re-exports a function named z3_leaf_module that shadows the submodule
    z3_mod = importlib.import_module("deepspeed.utils.z3_leaf_module")
    return types.SimpleNamespace(utils=utils, Config=DeepSpeedZeroLeafModuleConfig, config_mod=leaf_module_config,
                                 z3=z3_mod)


FUNCTION_NAMES = [
    "z3_leaf_module", "z3_leaf_parameter", "get_z3_leaf_modules", "set_z3_leaf_module", "set_z3_leaf_modules",
    "unset_z3_leaf_modules", "set_z3_leaf_modules_by_name", "set_z3_leaf_modules_by_suffix"
]


def test_same_names_and_parameters_as_deepspeed(ds):
    import leafpass.flags as lf
    for name in FUNCTION_NAMES:
        theirs = inspect.signature(getattr(ds.utils, name))
        ours = inspect.signature(getattr(lf, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        for param in theirs.parameters.values():
            assert ours.parameters[param.name].default == param.default, (name, param.name)
    assert list(DEFAULT_LEAF_MODULE_CLASSES) == ds.config_mod.DEFAULT_LEAF_MODULE_CLASSES
    assert list(DEFAULT_LEAF_MODULE_NAMES) == ds.config_mod.DEFAULT_LEAF_MODULE_NAMES
    assert list(DEFAULT_LEAF_MODULE_NAME_SUFFIXES) == ds.config_mod.DEFAULT_LEAF_MODULE_NAME_SUFFIXES


def test_flags_set_by_deepspeed_seen_by_leafpass(ds, model):
    ds.utils.set_z3_leaf_modules(model, [MoEBlock])
    ds.utils.set_z3_leaf_modules_by_name(model, ["norm"])
    assert names_of(model, get_z3_leaf_modules(model)) == ["layers.0.mlp", "layers.1.mlp", "norm"]
    ds.utils.unset_z3_leaf_modules(model, [SubMoEBlock])
    assert names_of(model, get_z3_leaf_modules(model)) == ["layers.0.mlp", "norm"]
    assert all(z3_leaf_module(m) == bool(ds.utils.z3_leaf_module(m)) for m in model.modules())


def test_flags_set_by_leafpass_seen_by_deepspeed(ds, model):
    set_z3_leaf_modules(model, ["MoEBlock"])
    set_z3_leaf_modules_by_suffix(model, ["norm"])
    assert ds.utils.get_z3_leaf_modules(model) == get_z3_leaf_modules(model)
    assert names_of(model, ds.utils.get_z3_leaf_modules(model)) == ["layers.0.mlp", "norm"]
    param = model.norm.weight
    param.ds_z3_leaf_module = model.norm
    assert ds.utils.z3_leaf_parameter(param) and z3_leaf_parameter(param)


PARITY_CALLS = [
    ("set_z3_leaf_modules", ([MoEBlock],), {}),
    ("set_z3_leaf_modules", ([nn.Module],), {}),
    ("set_z3_leaf_modules", (["MoEBlock", f"{__name__}.Outer.InnerBlock", "Linear"],), {}),
    ("set_z3_leaf_modules", (["Conv2d"],), {}),
    ("set_z3_leaf_modules", (["Conv2d"],), {"raise_if_not_found": False}),
    ("unset_z3_leaf_modules", ([nn.Linear],), {}),
    ("set_z3_leaf_modules_by_name", (["layers.0.mlp", "norm", "layers.0.mlp"],), {}),
    ("set_z3_leaf_modules_by_name", (["layers.0.mlp", "nope"],), {"raise_if_not_found": False}),
    ("set_z3_leaf_modules_by_name", (["nope"],), {}),
    ("set_z3_leaf_modules_by_name", (["norm"],), {"flag": False}),
    ("set_z3_leaf_modules_by_suffix", (["mlp", "0.mlp", "proj", ""],), {}),
    ("set_z3_leaf_modules_by_suffix", (["mlp", "zz"],), {"raise_if_not_found": False}),
    ("set_z3_leaf_modules_by_suffix", (["zz"],), {}),
]


def _run(model, fn, args, kwargs):
    try:
        result = fn(model, *args, **kwargs)
    except ValueError:
        return "ValueError", flag_state(model)
    index = {id(m): i for i, m in enumerate(model.modules())}
    if isinstance(result, tuple):
        result = ([index[id(m)] for m in result[0]], result[1])
    else:
        result = [index[id(m)] for m in result]
    return result, flag_state(model)


@pytest.mark.parametrize("name, args, kwargs", PARITY_CALLS)
def test_same_results_as_deepspeed(ds, model, name, args, kwargs):
    import leafpass.flags as lf
    theirs_model = copy.deepcopy(model)
    set_z3_leaf_module(model.norm, True)
    set_z3_leaf_module(theirs_model.norm, True)
    assert _run(model, getattr(lf, name), args, kwargs) == _run(theirs_model, getattr(ds.utils, name), args, kwargs)


def test_same_results_as_deepspeed_shared_module(ds):
    import leafpass.flags as lf
    shared = nn.Linear(2, 2)
    ours = nn.Sequential(nn.Sequential(shared), shared)
    theirs = copy.deepcopy(ours)
    for name, args in [("set_z3_leaf_modules", ([nn.Linear],)), ("unset_z3_leaf_modules", (["Sequential"],))]:
        assert _run(ours, getattr(lf, name), args,
                    {}) == _run(theirs, getattr(ds.utils, name), args, {})


CONFIG_CASES = [
    {},
    {"classes": "LayerNorm"},
    {"classes": ["LayerNorm", "MoEBlock", "LayerNorm"], "names": ["layers.2.mlp", "norm"], "name_suffixes": "mlp"},
    {"names": ["nope", "layers.1"], "name_suffixes": ["q_proj", "zz", "q_proj"]},
    {"classes": ["Conv2d"]},
    {"classes": [], "name_suffixes": ["1.mlp", "mlp", ""]},
]


@pytest.mark.parametrize("cfg", CONFIG_CASES)
def test_apply_config_same_as_deepspeed(ds, model, cfg):
    theirs_model = copy.deepcopy(model)
    index = {id(m): i for i, m in enumerate(model.modules())}
    theirs_index = {id(m): i for i, m in enumerate(theirs_model.modules())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = [index[id(m)] for m in apply_leaf_module_config(model, cfg)]
        ours_from_obj = apply_leaf_module_config(copy.deepcopy(model), ds.Config(**cfg))
    theirs = [theirs_index[id(m)] for m in ds.z3.apply_zero_leaf_module_config(theirs_model, ds.Config(**cfg))]
    assert ours == theirs
    assert len(ours_from_obj) == len(ours)
    assert flag_state(model) == flag_state(theirs_model)


def test_apply_config_same_as_deepspeed_on_mixtral(ds, tiny_mixtral):
    ours_model = copy.deepcopy(tiny_mixtral)
    theirs_model = copy.deepcopy(tiny_mixtral)
    cfg = {"name_suffixes": ["q_proj"]}
    ours = apply_leaf_module_config(ours_model, cfg)
    theirs = ds.z3.apply_zero_leaf_module_config(theirs_model, ds.Config(**cfg))
    assert names_of(ours_model, ours) == names_of(theirs_model, theirs) == ["model.layers.0.mlp",
                                                                           "model.layers.0.self_attn.q_proj"]
    assert flag_state(ours_model) == flag_state(theirs_model)


def test_config_errors_agree_with_deepspeed(ds, model):
    # DeepSpeed's pydantic model forbids unknown keys too; we say ValueError with the valid keys.
    for cfg in ({"stage": 3}, {"zero_optimization": {}}):
        with pytest.raises(Exception):
            ds.Config(**cfg)
        with pytest.raises(ValueError, match="valid keys"):
            apply_leaf_module_config(model, cfg)
    # A null leaf_module entry parses to the defaults, which is what our cfg=None means; DeepSpeed's
    # apply_zero_leaf_module_config(model, None) (an unparsed config) flags nothing instead.
    assert ds.Config.model_validate(None).classes == list(DEFAULT_LEAF_MODULE_CLASSES)
    assert ds.z3.apply_zero_leaf_module_config(model, None) == []
