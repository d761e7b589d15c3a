"""Every bad input gets one clear paragraph naming the problem and what to do: exit status 2 from
the CLI (never trainlint's own traceback; the user's, trimmed to their frames, when their code
raised) and a ``TrainlintError`` subclass from the API.

The CLI cases use the small model files in ``tests/bad_inputs/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from tests.conftest import CliRun, run_cli
from trainlint.errors import ConfigError, TargetError, TrainlintError, UserCodeError
from trainlint.target import load_target, parse_target

BAD = Path(__file__).resolve().parent / "bad_inputs"
NEUTRAL = BAD / "neutral.toml"
OWN_PACKAGE = Path(trainlint.__file__).resolve().parent


def cli(*args: Any, config: Path = NEUTRAL, cwd: Path = BAD) -> CliRun:
    return run_cli(["check", *args, "--config", config], cwd=cwd)


def frames(text: str) -> list:
    return [Path(p).resolve() for p in re.findall(r'File "([^"]+)", line \d+', text)]


def assert_clean_error(run: CliRun, *phrases: str, user_code: bool = False,
                       user_output: int = 0) -> str:
    """Exit 2, no report, one paragraph containing ``phrases``; return that paragraph.

    A traceback may follow only when the user's code raised, and it never shows a frame from
    trainlint's own package. ``user_output``: lines the user's code printed before it.
    """
    assert run.exit_code == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.rstrip("\n").splitlines()[user_output:]
    paragraph = lines[0]
    assert paragraph.startswith("trainlint: error: "), run.stderr
    for phrase in phrases:
        assert phrase in paragraph, f"{phrase!r} not in {paragraph!r}"
    if user_code:
        assert lines[1].startswith(("Traceback (most recent call last, your frames only)",
                                    "Raised in library code"))
    else:
        assert len(lines) == 1, run.stderr
    assert not any(OWN_PACKAGE in f.parents for f in frames(run.stderr)), run.stderr
    return paragraph


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def small_batch(n: int = 8) -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


# ------------------------------------------------------------------ the target file

def test_missing_file() -> None:
    assert_clean_error(cli("missing.py"), "target file not found: missing.py",
                       "path/to/model.py or path/to/model.py:NAME")
    with pytest.raises(TargetError, match="target file not found"):
        load_target(str(BAD / "missing.py"))


def test_a_file_name_with_a_colon_is_that_file(tmp_path: Path) -> None:
    (tmp_path / "v2:model.py").write_text((BAD / "fixed_batch.py").read_text())
    (tmp_path / "_helpers.py").write_text((BAD / "_helpers.py").read_text())
    run = run_cli(["check", "v2:model.py", "--format", "json"], cwd=tmp_path)
    assert run.exit_code == 0 and run.doc["target"]
    assert_clean_error(cli("missing.py:build_model"), "target file not found: missing.py")


def test_a_name_after_a_path_with_a_colon_is_the_factory(tmp_path: Path) -> None:
    """``c:d/model.py:build_model`` said 'target file not found' (only one colon was split)."""
    folder = tmp_path / "c:d"
    folder.mkdir()
    (folder / "model.py").write_text((BAD / "fixed_batch.py").read_text())
    (folder / "_helpers.py").write_text((BAD / "_helpers.py").read_text())
    run = run_cli(["check", "c:d/model.py:build_model", "--format", "json"], cwd=tmp_path)
    assert run.exit_code == 0 and run.doc["target"]
    assert parse_target("C:\\proj\\model.py") == (Path("C:\\proj\\model.py"), None)
    assert parse_target("C:\\proj\\model.py:small") == (Path("C:\\proj\\model.py"), "small")
    # A file that exists, with an empty NAME or one that is no Python name.
    model = str(folder / "model.py")
    assert parse_target(model + ":") == (Path(model), None)
    assert parse_target(model + ":build-model") == (Path(model), "build-model")


def test_folder_instead_of_file() -> None:
    assert_clean_error(cli("."), "is a folder", "model.py")


def test_file_that_raises_on_import_shows_the_users_traceback_only() -> None:
    run = cli("raises_on_import.py")
    assert_clean_error(run, "importing raises_on_import.py raised KeyError: 'depth'",
                       "fix the error in your file", user_code=True)
    shown = frames(run.stderr)
    assert shown == [BAD / "raises_on_import.py"] * 2, "only the user's two frames"
    assert 'return {"width": 8}["depth"]' in run.stderr and "importlib" not in run.stderr
    with pytest.raises(UserCodeError) as info:
        load_target(str(BAD / "raises_on_import.py"))
    assert info.value.phase == "import"
    assert "raises_on_import.py" in info.value.user_traceback


def test_file_that_exits_on_import() -> None:
    run = cli("exits_at_import.py")
    assert run.stderr.startswith("usage: "), "argparse's own message comes first"
    assert_clean_error(run, "importing exits_at_import.py called sys.exit(2)",
                       'if __name__ == "__main__":', user_code=True, user_output=2)


def test_user_code_that_exits_during_the_check_is_exit_2() -> None:
    assert_clean_error(cli("exits_in_build.py"), "called sys.exit(3) during the check",
                       user_code=True)


def test_an_interrupted_check_is_exit_2_not_a_finding() -> None:
    assert_clean_error(cli("interrupted.py"), "interrupted (KeyboardInterrupt)")


def test_a_dataloader_batch_list_is_inputs_and_targets() -> None:
    run = cli("loader_batch.py", "--format", "json")
    assert run.exit_code in (0, 1), run.stderr
    assert run.doc["run"]["batch_size"] == 32
    assert "default loss: cross-entropy" in run.doc["run"]["notes"]  # with the list's targets


def test_named_tuples_in_the_batch_stay_named_tuples(tmp_path: Path) -> None:
    """Targets as a typing.NamedTuple read by the user's loss by field: the CLI moves them to
    the device as they are (it once rebuilt them as type(t)(generator), which a named tuple's
    constructor rejects, and blamed get_batch)."""
    (tmp_path / "named.py").write_text(
        "import torch, torch.nn as nn, torch.nn.functional as F\n"
        "from typing import NamedTuple\n"
        "class Targets(NamedTuple):\n"
        "    cls: torch.Tensor\n"
        "    reg: torch.Tensor\n"
        "def build_model():\n"
        "    return nn.Linear(16, 5)\n"
        "def get_batch():\n"
        "    return torch.randn(32, 16), Targets(torch.randint(0, 4, (32,)), torch.randn(32))\n"
        "def loss_fn(out, t):\n"
        "    assert isinstance(t, Targets)\n"
        "    return F.cross_entropy(out[:, :4], t.cls) + F.mse_loss(out[:, 4], t.reg)\n")
    run = cli("named.py", "--format", "json", cwd=tmp_path)
    assert run.exit_code == 0, run.stderr
    assert run.doc["run"]["batch_size"] == 32


@pytest.mark.parametrize("inputs", ["packed", "(packed,)"])
def test_a_packed_sequence_is_one_model_input(tmp_path: Path, inputs: str) -> None:
    """A PackedSequence is a named tuple of four tensors, yet one argument of an RNN's forward:
    it once became four positional arguments (the user's model raised a TypeError, and the
    message blamed the batch), and inside a tuple of inputs it was refused. The batch size is
    the sequences', not the packed data's (time steps x sequences)."""
    (tmp_path / "packed.py").write_text(
        "import torch, torch.nn as nn\n"
        "from torch.nn.utils.rnn import pack_padded_sequence\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.rnn, self.head = nn.GRU(4, 16), nn.Linear(16, 3)\n"
        "    def forward(self, packed):\n"
        "        return self.head(self.rnn(packed)[1][-1])\n"
        "def build_model():\n"
        "    return Net()\n"
        "def get_batch():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    lengths = torch.randint(2, 9, (24,), generator=g)\n"
        "    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(8, 24, 4, generator=g),\n"
        "                                               lengths, enforce_sorted=False)\n"
        f"    return {inputs}, torch.randint(0, 3, (24,), generator=g)\n")
    run = cli("packed.py", "--format", "json", cwd=tmp_path)
    assert run.exit_code == 0, run.stderr
    assert run.doc["run"]["batch_size"] == 24


def test_a_file_that_does_not_parse_shows_where(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import torch\n\ndef build_model(:\n    pass\n")
    run = cli("broken.py", cwd=tmp_path)
    assert run.exit_code == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines[0] == ("trainlint: error: broken.py does not parse: SyntaxError: invalid "
                        "syntax (line 3); fix the error in your file")
    assert lines[1] == "Where it fails to parse:"
    assert "def build_model(:" in run.stderr and "library code" not in run.stderr
    assert not any(OWN_PACKAGE in f.parents for f in frames(run.stderr))


def test_an_input_shape_that_get_batch_overrides_is_noted() -> None:
    run = cli("fixed_batch.py", "--input-shape", "4,8", "--format", "json")
    assert run.exit_code == 0, run.stderr
    assert ("--input-shape 4,8 was not used: get_batch() in fixed_batch.py makes the batch"
            in run.doc["run"]["notes"])


def test_no_model_lists_the_names_looked_for() -> None:
    assert_clean_error(cli("no_model.py"), "no model found in no_model.py",
                       "looked for: build_model, model", "no_model.py:NAME")


def test_named_model_that_does_not_exist_lists_what_the_file_defines() -> None:
    assert_clean_error(cli("fixed_batch.py:nothere"), "fixed_batch.py has no name 'nothere'",
                       "it defines build_model, get_batch")


def test_factory_returning_a_non_module() -> None:
    assert_clean_error(cli("not_a_module.py"),
                       "build_model() in not_a_module.py gave a list of 3 (Linear, ReLU, Linear)",
                       "not a torch.nn.Module", "nn.Sequential")
    with pytest.raises(TargetError, match="must be a torch.nn.Module, got list"):
        trainlint.check([nn.Linear(8, 4)], small_batch())


def test_get_batch_that_raises_shows_the_users_frames() -> None:
    run = cli("batch_raises.py")
    assert_clean_error(run, "get_batch() raised FileNotFoundError: no such shard: shard-000.pt",
                       user_code=True)
    assert frames(run.stderr) == [BAD / "batch_raises.py"] * 2

    def get_batch() -> Any:
        raise OSError("disk gone")

    with pytest.raises(UserCodeError, match="the batch function raised OSError: disk gone") as info:
        trainlint.check(small_model(), get_batch)
    assert info.value.phase == "batch"


# ------------------------------------------------------------------ the batch

def test_batch_of_the_wrong_shape_shows_the_models_error_and_what_was_fed() -> None:
    run = cli("wrong_shape.py")
    assert_clean_error(
        run, "the model's forward pass (in module '0') raised RuntimeError in training step 1",
        "mat1 and mat2 shapes cannot be multiplied (8x5 and 8x16)",
        "it was fed input 0: float32 tensor of shape (8, 5); targets: int64 tensor of shape (8,)",
        "check that the batch is what the model's forward expects", user_code=True)
    assert "Raised in library code" in run.stderr and "linear.py" in run.stderr
    with pytest.raises(UserCodeError, match=r"input 0: float32 tensor of shape \(8, 5\)") as info:
        trainlint.check(small_model(), (torch.randn(8, 5), torch.randint(0, 4, (8,))))
    assert info.value.phase == "forward"


def test_a_layer_inside_that_does_not_fit_names_what_reached_it() -> None:
    """A second layer built for 15 features behind one that makes 16: the message showed the
    batch (4, 8), which was fine, and said to check it."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(15, 3))
    with pytest.raises(UserCodeError) as info:
        trainlint.check(model, (torch.randn(4, 8), torch.randint(0, 3, (4,))))
    message = str(info.value)
    assert "(in module '2')" in message
    assert "'2' was fed a float32 tensor of shape (4, 16)" in message
    assert "the batch: input 0: float32 tensor of shape (4, 8)" in message
    assert "check that the batch is what" not in message


def test_batch_of_the_wrong_dtype() -> None:
    assert_clean_error(cli("wrong_dtype.py"), "mat1 and mat2 must have the same dtype",
                       "it was fed input 0: int64 tensor of shape (8, 8)", user_code=True)


def test_keyword_inputs_are_named_in_the_message() -> None:
    with pytest.raises(UserCodeError, match=r"input 'input': float32 tensor of shape \(4, 3\)"):
        trainlint.check(small_model(), {"input": torch.randn(4, 3)})


def test_batch_of_the_wrong_type() -> None:
    assert_clean_error(cli("wrong_type.py"), "the batch must be a tensor, a tuple of tensors or "
                       "a dict of tensors", "got a str")
    with pytest.raises(TargetError, match="got a str"):
        trainlint.check(small_model(), "data/train.csv")


def test_empty_batch() -> None:
    assert_clean_error(cli("empty_batch.py"), "the batch is empty", "shape (0, 8)",
                       "at least one sample")
    with pytest.raises(TargetError, match="the batch is empty"):
        trainlint.check(small_model(), (torch.randn(0, 8), torch.zeros(0, dtype=torch.long)))


def test_inputs_on_another_device_than_the_model() -> None:
    x, y = small_batch()
    with pytest.raises(TargetError, match=r"input 0 is on meta but the model is on cpu: move the "
                                          r"batch to the model's device \(e\.g\. \.to\('cpu'\)"):
        trainlint.check(small_model(), (x.to("meta"), y))
    with pytest.raises(TargetError, match="the targets is on meta"):
        trainlint.check(small_model(), (x, y.to("meta")))
    with pytest.raises(TargetError, match=r"input 'input' is on meta"):
        trainlint.check(small_model(), {"input": x.to("meta")})


def test_model_on_the_meta_device() -> None:
    with pytest.raises(TargetError, match="meta device .* model.to_empty"):
        trainlint.check(nn.Linear(8, 4, device="meta"), small_batch())


def test_uninitialized_lazy_model() -> None:
    with pytest.raises(TargetError, match="uninitialized lazy parameters .* forward pass"):
        trainlint.check(nn.Sequential(nn.LazyLinear(4)), small_batch())


def test_no_batch_at_all() -> None:
    assert_clean_error(cli("no_batch.py"), "no batch: define get_batch() in no_batch.py",
                       "--input-shape")


def test_a_check_that_cannot_run_is_an_error_annotation_in_github_format() -> None:
    """GitHub Actions shows workflow commands from the step's output: exit 2 without one left
    the job's annotations empty. The user code's traceback stays on stderr."""
    run = cli("no_batch.py", "--format", "github")
    assert run.exit_code == 2
    [line] = run.stdout.splitlines()
    assert line.startswith("::error title=trainlint (exit 2)::trainlint could not run the "
                           "check: no batch: define get_batch() in no_batch.py")
    assert run.stderr.startswith("trainlint: error: no batch")
    raised = cli("forward_raises.py", "--format", "github")
    assert raised.exit_code == 2 and raised.stdout.startswith("::error title=")
    assert len(raised.stdout.splitlines()) == 1 and "Traceback" not in raised.stdout
    assert "Traceback" in raised.stderr


@pytest.mark.parametrize("shape", ["a,b", "0,8", "", "8,-1", "8;8", "3,x", "32,,3", "8,"])
def test_malformed_input_shape(shape: str) -> None:
    assert_clean_error(cli("no_batch.py", "--input-shape", shape),
                       "--input-shape must be positive integers separated by commas, like "
                       f"32,3,32,32 (batch first); got {shape!r}")


def test_input_shape_works_when_well_formed() -> None:
    run = cli("no_batch.py", "--input-shape", "4,8", "--format", "json")
    assert run.exit_code in (0, 1) and run.doc["run"]["batch_size"] == 4


def test_a_get_batch_that_needs_a_batch_size_without_one(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(
        "import torch\nimport torch.nn as nn\n\n\ndef build_model():\n"
        "    return nn.Linear(8, 4)\n\n\ndef get_batch(n, scale=1.0):\n"
        "    return scale * torch.randn(n, 8), torch.randint(0, 4, (n,))\n")
    assert_clean_error(cli("model.py", cwd=tmp_path), "get_batch(n) in model.py needs a batch "
                       "size: pass --batch-size N, or give n a default")
    run = cli("model.py", "--batch-size", "4", "--format", "json", cwd=tmp_path)
    assert run.exit_code in (0, 1) and run.doc["run"]["batch_size"] == 4
    (tmp_path / "two.py").write_text(
        "import torch\nimport torch.nn as nn\n\n\ndef build_model():\n"
        "    return nn.Linear(8, 4)\n\n\ndef get_batch(n, scale):\n"
        "    return scale * torch.randn(n, 8), torch.randint(0, 4, (n,))\n")
    for extra in ((), ("--batch-size", "4")):
        assert_clean_error(cli("two.py", *extra, cwd=tmp_path), "get_batch(n, scale) in two.py "
                           "takes 2 arguments without defaults", "give scale a default")


def test_batch_size_with_a_get_batch_that_takes_no_argument(tmp_path: Path) -> None:
    assert_clean_error(cli("fixed_batch.py", "--batch-size", "4"),
                       "--batch-size is 4 but get_batch() in fixed_batch.py takes no "
                       "batch size", "drop --batch-size, or define get_batch(batch_size)")
    # Set in the config, not on the command line: the message says where.
    (tmp_path / "fixed_batch.py").write_text((BAD / "fixed_batch.py").read_text())
    (tmp_path / "_helpers.py").write_text((BAD / "_helpers.py").read_text())
    (tmp_path / "lint.toml").write_text("[tool.trainlint]\nbatch-size = 16\n")
    run = cli("fixed_batch.py", config=tmp_path / "lint.toml", cwd=tmp_path)
    assert_clean_error(run, "batch-size in ", "lint.toml [tool.trainlint] is 16 but "
                       "get_batch() in fixed_batch.py takes no batch size", "drop batch-size")
    assert "--batch-size" not in run.stderr


@pytest.mark.parametrize("signature, given", [("*, batch_size=16", True),
                                              ("**options", True), ("*, seed=0", False)])
def test_a_keyword_only_batch_size_is_passed_by_keyword(
        tmp_path: Path, signature: str, given: bool) -> None:
    """get_batch(*, batch_size=16) with --batch-size 8 raised the user's TypeError ('takes 0
    positional arguments but 1 was given')."""
    size = "batch_size" if "batch_size" in signature else "options.get('batch_size', 16)"
    (tmp_path / "model.py").write_text(
        "import torch\nimport torch.nn as nn\n\n\ndef build_model():\n"
        f"    return nn.Linear(8, 4)\n\n\ndef get_batch({signature}):\n"
        f"    n = {size if 'seed' not in signature else 16}\n"
        "    return torch.randn(n, 8), torch.randint(0, 4, (n,))\n")
    run = cli("model.py", "--batch-size", "8", "--format", "json", cwd=tmp_path)
    if given:
        assert run.exit_code in (0, 1), run.stderr
        assert run.doc["run"]["batch_size"] == 8
    else:
        assert_clean_error(run, "get_batch() in model.py takes no batch size")


def test_a_model_file_inside_a_package_imports_as_pytest_does(tmp_path: Path) -> None:
    """pkg/model.py with `from .layers import make` failed ('attempted relative import with
    no known parent package'); pytest imports it as pkg.model. Sibling absolute imports keep
    working."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text("import torch.nn as nn\n\n\ndef make():\n"
                                   "    return nn.Linear(8, 4)\n")
    (pkg / "helpers.py").write_text("import torch\n\n\ndef batch():\n"
                                    "    return torch.randn(16, 8), torch.randint(0, 4, (16,))\n")
    (pkg / "model.py").write_text("from helpers import batch\n\nfrom .layers import make\n\n"
                                  "model = make()\n\n\ndef get_batch():\n"
                                  "    return batch()\n")
    run = cli("pkg/model.py", "--format", "json", cwd=tmp_path)
    assert run.exit_code in (0, 1), run.stderr
    assert run.doc["run"]["batch_size"] == 16


def test_a_model_file_without_relative_imports_is_imported_as_before(tmp_path: Path) -> None:
    """Only a file with relative imports is imported inside its package: a package whose
    __init__ needs what is not installed, or a base folder with a module of a sibling's name,
    broke files that worked."""
    pkg = tmp_path / "proj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import not_installed_anywhere\n")
    (pkg / "proj_blocks_x7.py").write_text("import torch.nn as nn\n\n\ndef make():\n"
                                           "    return nn.Linear(8, 4)\n")
    (tmp_path / "proj_blocks_x7.py").write_text("# the repository's own helpers: no make()\n")
    (pkg / "model.py").write_text("import torch\nfrom proj_blocks_x7 import make\n\n"
                                  "model = make()\n\n\n"
                                  "def get_batch():\n"
                                  "    return torch.randn(16, 8), torch.randint(0, 4, (16,))\n")
    run = cli(pkg / "model.py", "--format", "json", cwd=tmp_path.parent)
    assert run.exit_code in (0, 1), run.stderr


# ------------------------------------------------------------------ the model and loss

def test_model_with_no_trainable_parameters() -> None:
    assert_clean_error(cli("no_trainable.py"), "the model has no trainable parameters",
                       "4 parameter(s)", "requires_grad_(True)")
    model = small_model().requires_grad_(False)
    with pytest.raises(TargetError, match="no trainable parameters"):
        trainlint.check(model, small_batch())


def test_forward_that_returns_no_tensor() -> None:
    assert_clean_error(cli("no_tensor_output.py"),
                       "the model's forward returned a dict {'score': a float}",
                       "no floating-point tensor", "return the logits")

    class ReturnsNone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> None:
            self.linear(x)

    with pytest.raises(TargetError, match="the model's forward returned a NoneType"):
        trainlint.check(ReturnsNone(), small_batch())


def test_loss_that_is_not_a_scalar() -> None:
    assert_clean_error(cli("non_scalar_loss.py"), "the loss must be a scalar, got shape (8,)",
                       ".mean()")

    def per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    with pytest.raises(TargetError, match=r"must be a scalar, got shape \(8,\)"):
        trainlint.check(small_model(), small_batch(), loss_fn=per_sample)
    with pytest.raises(TargetError, match=r"got a float: return the loss tensor .*loss\.item"):
        trainlint.check(small_model(), small_batch(),
                        loss_fn=lambda out, y: F.cross_entropy(out, y).item())
    with pytest.raises(TargetError, match="does not require grad"):
        trainlint.check(small_model(), small_batch(),
                        loss_fn=lambda out, y: F.cross_entropy(out.detach(), y))


def test_user_forward_raising_is_trimmed_to_the_users_frames() -> None:
    run = cli("forward_raises.py")
    assert_clean_error(run, "the model's forward pass raised ValueError in training step 1: "
                       "inputs must be in [0, 0]", "it was fed input 0: float32 tensor of "
                       "shape (8, 8)", user_code=True)
    assert frames(run.stderr) == [BAD / "forward_raises.py"] * 2
    assert "torch/nn/modules" not in run.stderr


def test_torchscript_model() -> None:
    assert_clean_error(cli("torchscript.py"), "TorchScript module",
                       "do not run Python hooks", "eager nn.Module")
    with pytest.raises(TargetError, match="TorchScript"):
        trainlint.check(torch.jit.script(small_model()), small_batch())
    partly = nn.Sequential(nn.Linear(8, 8), torch.jit.script(nn.Linear(8, 4)))
    with pytest.raises(TargetError, match="submodule '1' is a TorchScript module"):
        trainlint.check(partly, small_batch())


def test_a_monitor_on_a_torchscript_model_says_why_it_cannot_watch_it() -> None:
    """Monitor once raised torch's own RuntimeError from hooking a scripted submodule
    ("register_forward_pre_hook is not supported on ScriptModules"); it says what check says,
    and leaves no hook behind."""
    partly = nn.Sequential(nn.Linear(8, 8), torch.jit.script(nn.Linear(8, 4)))
    opt = torch.optim.SGD(partly.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="submodule '1' is a TorchScript module"):
        trainlint.Monitor(partly, opt)
    assert not partly[0]._forward_hooks and not partly[0]._forward_pre_hooks
    with pytest.raises(ConfigError, match="the model is a TorchScript module"):
        trainlint.Monitor(torch.jit.script(small_model()), None)


class CountingBackend:
    """A torch.compile backend that only counts how often Dynamo handed it a graph."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        self.compiles += 1
        return gm.forward


def test_compiled_model_is_probed_through_its_original_module() -> None:
    run = cli("compiled.py", "--format", "json")
    assert run.exit_code == 0, run.stderr
    assert "the model is torch.compile'd: the original module was probed eagerly" in \
        run.doc["run"]["notes"]
    assert [layer["module"] for layer in run.doc["layers"]][:3] == ["0", "1", "2"]

    backend = CountingBackend()
    model = small_model()
    compiled = torch.compile(model, backend=backend)
    report = trainlint.check(compiled, small_batch())
    assert backend.compiles == 0, "the compiled graph was never built or run"
    assert any("torch.compile" in note for note in report.notes)
    assert {layer.module for layer in report.trace.layers} >= {"0", "1", "2"}


def _raise_oom() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class _OomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _raise_oom()


class OomInBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OomInBackward.apply(x)


class OomOptimizer(torch.optim.SGD):
    def step(self, closure: Any = None) -> None:
        _raise_oom()


def test_out_of_memory_names_the_phase_and_suggests_a_smaller_batch() -> None:
    run = cli("out_of_memory.py")
    assert_clean_error(run, "out of memory in the model's forward pass (in module '1') of "
                       "training step 1", "fed input 0: float32 tensor of shape (8, 8)",
                       "CUDA out of memory. Tried to allocate 20.00 GiB",
                       "try a smaller batch (--batch-size", user_code=True)
    assert frames(run.stderr) == [BAD / "out_of_memory.py"]

    model = nn.Sequential(nn.Linear(8, 8), OomInBackward(), nn.Linear(8, 4))
    with pytest.raises(UserCodeError, match="out of memory in the backward pass of training "
                                            "step 1.*try a smaller batch") as info:
        trainlint.check(model, small_batch())
    assert info.value.phase == "backward"
    with pytest.raises(UserCodeError, match="out of memory in the optimizer step") as info:
        trainlint.check(small_model(), small_batch(),
                        optimizer=lambda params: OomOptimizer(params, lr=0.1))
    assert info.value.phase == "optimizer step"


class CpuHungry(nn.Module):
    """Asks the CPU allocator for a petabyte: a real out-of-memory error, a RuntimeError."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.empty(2**50, dtype=torch.uint8).sum()


def test_running_out_of_cpu_memory_is_named_as_such() -> None:
    with pytest.raises(UserCodeError, match="out of memory in the model's forward pass .*of "
                                            "training step 1.*try a smaller batch") as info:
        trainlint.check(nn.Sequential(nn.Linear(8, 8), CpuHungry()), small_batch())
    assert "can't allocate memory" in str(info.value)


class Cancelled(BaseException):
    """Not an Exception: what asyncio.CancelledError and GeneratorExit are too."""


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("no text")


def test_a_base_exception_from_the_users_code_is_exit_2_with_their_traceback(
        tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(
        "class Cancelled(BaseException):\n    pass\n\n\ndef build_model():\n"
        "    raise Cancelled('stop')\n")
    run = run_cli(["check", "model.py", "--config", NEUTRAL], cwd=tmp_path)
    assert_clean_error(run, "the model's code raised Cancelled during the check: stop",
                       user_code=True)


def test_an_exception_whose_text_cannot_be_made_is_still_the_users() -> None:
    def batch() -> tuple:
        raise UnprintableError()

    with pytest.raises(UserCodeError, match=r"the batch function raised UnprintableError: "
                                            r"\(its message could not be shown"):
        trainlint.check(small_model(), batch)


def test_tensors_nested_in_dicts_of_the_batch_are_its_inputs() -> None:
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 4)

        def forward(self, a: dict) -> torch.Tensor:
            return self.linear(a["x"]["y"])

    x, y = small_batch()
    report = trainlint.check(Nested(), ({"a": {"x": {"y": x}}}, y))
    assert report.trace.batch_size == 8
    with pytest.raises(TargetError, match="holds no tensor"):
        trainlint.check(Nested(), ({"a": {"x": {"y": None}}}, y))


def test_a_model_file_that_changes_the_working_directory_keeps_report_paths_ours(
        tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.py").write_text(
        "import os\nimport torch\nimport torch.nn as nn\n\n"
        "os.chdir(os.path.dirname(os.path.abspath(__file__)))\n\n\n"
        "def build_model():\n    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))\n"
        "    nn.init.constant_(model[0].bias, -5.0)\n    return model\n\n\n"
        "def get_batch():\n    return torch.randn(8, 16), torch.randint(0, 4, (8,))\n")
    run = run_cli(["check", "sub/model.py", "--format", "json", "--config", NEUTRAL],
                  cwd=tmp_path)
    assert run.exit_code == 1, run.stderr
    assert run.doc["target"] == "sub/model.py"
    paths = {f["location"]["path"] for f in run.doc["findings"] if f.get("location")}
    assert paths == {"sub/model.py"}


# ------------------------------------------------------------------ options

@pytest.mark.parametrize("steps", ["0", "-3", str(10**12)])
def test_steps_out_of_range(steps: str) -> None:
    assert_clean_error(cli("fixed_batch.py", "--steps", steps),
                       f"--steps must be a whole number from 1 to 1000, got {steps}")


@pytest.mark.parametrize("steps", [0, -1, 10**6, 2.5, True, "3"])
def test_api_steps_out_of_range(steps: Any) -> None:
    with pytest.raises(ConfigError, match="steps must be a whole number from 1 to 1000"):
        trainlint.check(small_model(), small_batch(), steps=steps)


def test_steps_not_a_number_is_a_usage_error() -> None:
    run = cli("fixed_batch.py", "--steps", "many")
    assert run.exit_code == 2 and "'many' is not a valid integer" in run.stderr


@pytest.mark.parametrize("option,value", [("--select", "TL999"), ("--ignore", "dead-reluu"),
                                          ("--select", "TL101,nonsense")])
def test_unknown_rule_codes_on_the_command_line(option: str, value: str) -> None:
    bad = value.split(",")[-1]
    assert_clean_error(cli("fixed_batch.py", option, value),
                       f"{option}: unknown rule {bad!r}", "`trainlint rules` lists them")


def test_device_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_clean_error(cli("fixed_batch.py", "--device", "cuda"),
                       "--device is 'cuda', but CUDA is not available here",
                       "use --device cpu or auto")


def test_device_index_beyond_the_visible_gpus(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = write(tmp_path, '[tool.trainlint]\ndevice = "cuda:3"\n')
    assert_clean_error(cli("fixed_batch.py", config=config), "device in",
                       "is 'cuda:3', but only 1 CUDA device(s) are visible")


@pytest.mark.parametrize("seed", ["-1", str(2**40)])
def test_seed_out_of_range(seed: str) -> None:
    assert_clean_error(cli("fixed_batch.py", "--seed", seed),
                       f"--seed must be a whole number from 0 to 2**32 - 1, got {seed}")


# ------------------------------------------------------------------ config

def write(folder: Path, text: str, name: str = "lint.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("table,phrases", [
    ('[tool.trainlint\nselect = ["TL101"]\n', ["not valid TOML", "line 1"]),
    ('[tool.trainlint]\nselect = "TL101"\n', ["select must be a list of rule codes or names"]),
    ('[tool.trainlint]\nselct = ["TL101"]\n', ["unknown key(s) selct", "known: batch-size"]),
    ('[tool.trainlint]\nselect = ["TL999"]\n', ["[tool.trainlint]: unknown rule 'TL999'"]),
    ('[tool.trainlint]\nignore = ["no-such-rule"]\n', ["unknown rule 'no-such-rule'"]),
    ('[tool.trainlint]\nsteps = "3"\n', ["steps in", "must be a whole number from 1 to 1000, "
                                                    "got '3'"]),
    ('[tool.trainlint]\nsteps = 0\n', ["steps in", "got 0"]),
    ('[tool.trainlint]\nbatch-size = 2.5\n', ["batch-size in", "got 2.5"]),
    ('[tool.trainlint]\nseed = "x"\n', ["seed in", "got 'x'"]),
    ('[tool.trainlint]\ndevice = "tpu"\n', ["device in", "must be auto, cpu, cuda or cuda:N, "
                                                         "got 'tpu'"]),
    ('[tool.trainlint]\nfail-on = "sometimes"\n', ["fail-on must be error, warning, info or "
                                                   "never"]),
    ('[tool.trainlint]\nrules = 3\n', ["rules must hold one table per rule"]),
    ("[tool.trainlint.rules.TL101]\ndead_fraction = 'high'\n",
     ["TL101.dead_fraction must be a number, got 'high'"]),
    ("[tool.trainlint.rules.TL999]\nx = 1\n", ["unknown rule 'TL999'"]),
])
def test_malformed_config(tmp_path: Path, table: str, phrases: list) -> None:
    config = write(tmp_path, table)
    paragraph = assert_clean_error(cli("fixed_batch.py", config=config), *phrases)
    assert str(config) in paragraph, "the message names the config file"


def test_malformed_pyproject_found_by_discovery(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text((BAD / "fixed_batch.py").read_text())
    (tmp_path / "_helpers.py").write_text((BAD / "_helpers.py").read_text())
    write(tmp_path, "[tool.trainlint]\nsteps = [\n", name="pyproject.toml")
    run = run_cli(["check", "model.py"], cwd=tmp_path)
    assert_clean_error(run, "pyproject.toml: not valid TOML")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_clean_error(cli("fixed_batch.py", config=tmp_path / "nope.toml"),
                       "config file not found")


# ------------------------------------------------------------------ trainlint's own bugs

def test_an_internal_error_is_exit_2_and_says_it_is_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainlint.runner

    def broken(*args: Any, **kwargs: Any) -> str:
        raise KeyError("layout")

    monkeypatch.setattr(trainlint.runner, "render", broken)
    run = cli("fixed_batch.py")
    assert run.exit_code == 2
    assert run.stderr.startswith("trainlint: internal error: KeyError: 'layout'. This is a bug "
                                 "in trainlint, not in your code")


def test_a_bug_in_trainlints_hooks_is_not_blamed_on_the_user(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import trainlint.stats

    def broken(*args: Any, **kwargs: Any) -> None:
        raise IndexError("stats bug")

    monkeypatch.setattr(trainlint.stats.ActivationBatch, "add", broken)
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(IndexError, match="stats bug"):
        trainlint.check(model, small_batch())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    run = cli("fixed_batch.py")
    assert run.exit_code == 2
    assert run.stderr.startswith("trainlint: internal error: IndexError: stats bug. This is a "
                                 "bug in trainlint")


def test_every_api_error_is_a_trainlint_error() -> None:
    assert all(issubclass(e, TrainlintError) for e in (ConfigError, TargetError, UserCodeError))


def test_an_optimizer_factory_that_returns_several_points_to_the_monitor() -> None:
    def both(params: list) -> list:
        params = list(params)
        return [torch.optim.SGD(params[:2], lr=0.1), torch.optim.Adam(params[2:], lr=1e-3)]

    with pytest.raises(TargetError, match=r"returned list.*trainlint.Monitor\(model, "
                                          r"optimizer=\[\.\.\.\]\)"):
        trainlint.check(small_model(), small_batch(), optimizer=both)


class CarriedState(nn.Module):
    """An RNN whose hidden state is carried from one batch to the next without ``detach()``."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)
        self.hidden: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.hidden = self.rnn(x, self.hidden)
        return self.head(out[:, -1])


def test_a_graph_kept_from_an_earlier_step_says_what_to_detach() -> None:
    batch = (torch.randn(4, 5, 8), torch.randint(0, 4, (4,)))
    with pytest.raises(UserCodeError, match="backward pass raised RuntimeError in training "
                       r"step 2: .*second time.*carried over from an earlier step .*\.detach\(\)"):
        trainlint.check(CarriedState(), batch)


def test_a_loss_cut_off_from_the_model_is_a_finding_not_a_note() -> None:
    """``requires_grad_()`` on detached outputs passes the loss check, and the model gets no
    gradient at all."""
    report = trainlint.check(small_model(), small_batch(), loss_fn=lambda out, y: F.cross_entropy(
        out.detach().requires_grad_(), y))
    assert [(f.code, f.module) for f in report.findings] == [("TL505", "")]
    assert not report.ok


class FusedStep(nn.Module):
    """The optimizer step fused into the backward (PyTorch's memory-saving recipe): a hook
    steps each parameter as its gradient lands and drops the ``.grad``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.opts = {p: torch.optim.SGD([p], lr=0.05) for p in self.net.parameters()}
        for p in self.net.parameters():
            p.register_post_accumulate_grad_hook(self._step)

    def _step(self, p: nn.Parameter) -> None:
        self.opts[p].step()
        self.opts[p].zero_grad(set_to_none=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_an_optimizer_fused_into_the_backward_is_no_loss_cut_off() -> None:
    model = FusedStep()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = small_batch()
    F.cross_entropy(model(x), y).backward()  # the truth: the backward alone trains it
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    report = trainlint.check(FusedStep(), small_batch())
    assert "TL505" not in [f.code for f in report.findings]
