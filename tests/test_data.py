"""Dataset readers, calibration sampling and evaluators, on tiny files with known answers."""

from __future__ import annotations

import io
import math
import os
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from allocator.data import (
    HIGHER_IS_BETTER,
    EvalSet,
    ImageSet,
    SentencePairs,
    TextCorpus,
    calibration_batches,
    evaluate,
    holdout_batches,
    load_dataset,
    readers,
)
from allocator.data.evaluate import kl_divergence, top1
from allocator.data.readers import BOMB_RATIO, DatasetTooLarge
from allocator.errors import BadDataset
from allocator.zoo import LoadedModel

SHARED_DATA = Path(
    os.environ.get(
        "BITPLAN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"shared data not found at {SHARED_DATA}; set BITPLAN_SHARED_DATA to its folder",
)


# --- tiny models with outputs we can predict --------------------------------------------------


class ChannelMeans(nn.Module):
    """Logits = per-channel means: the brightest channel is the predicted class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def image_model(num_classes: int | None = 3, task: str = "classification") -> LoadedModel:
    return LoadedModel(
        ref="test:channel-means",
        module=ChannelMeans(),
        task=task,
        input_kind="image",
        image_size=4,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_classes=num_classes,
    )


def images_brightest_in(channels: list[int]) -> np.ndarray:
    images = np.zeros((len(channels), 4, 4, 3), dtype=np.uint8)
    for index, channel in enumerate(channels):
        images[index, :, :, channel] = 200
        images[index, 0, 0, :] = index  # makes every image distinct
    return images


class TableText:
    """A text model whose sentences are vocabulary indices into a fixed embedding table."""

    def __init__(self, vocabulary: list[str], table: torch.Tensor) -> None:
        self.vocabulary = vocabulary
        self.seen: list[str] = []
        self.model = LoadedModel(
            ref="test:table",
            module=nn.Embedding.from_pretrained(table),
            task="embedding",
            input_kind="text",
            tokenizer=self.tokenize,
            output_fn=lambda module, inputs: module(inputs["ids"]),
        )

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        self.seen.extend(sentences)
        return {"ids": torch.tensor([self.vocabulary.index(s) for s in sentences])}


def sts_model_and_pairs(gold: list[float]) -> tuple[TableText, SentencePairs]:
    """Pairs whose cosine similarity rises with `gold`; sentence lengths deliberately shuffled."""
    count = len(gold)
    first = [f"first {'x' * ((7 * i) % count)} {i}" for i in range(count)]
    second = [f"second {'y' * ((3 * i) % count)} {i}" for i in range(count)]
    table = torch.zeros(2 * count, 2)
    for rank, pair in enumerate(np.argsort(gold)):
        angle = (count - 1 - rank) * 0.1
        table[pair] = torch.tensor([1.0, 0.0])
        table[count + pair] = torch.tensor([math.cos(angle), math.sin(angle)])
    return TableText(first + second, table), SentencePairs(first, second, np.asarray(gold))


# --- readers --------------------------------------------------------------------------------


def test_npz_reader_returns_images_and_labels(tmp_path: Path) -> None:
    images = images_brightest_in([0, 1, 2])
    np.savez(tmp_path / "set.npz", images=images, labels=np.array([0, 1, 2], dtype=np.int32))
    np.savez(tmp_path / "unlabelled.npz", images=images)

    labelled = load_dataset(tmp_path / "set.npz")
    unlabelled = load_dataset(str(tmp_path / "unlabelled.npz"))

    assert isinstance(labelled, ImageSet)
    assert np.array_equal(labelled.images, images)
    assert labelled.labels.tolist() == [0, 1, 2]
    assert len(labelled) == 3
    assert unlabelled.labels is None


def test_sts_reader_takes_score_and_sentences_and_ignores_extra_fields(tmp_path: Path) -> None:
    lines = [
        "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man is dancing.\tA man dances.",
        "",
        'main-news\theadlines\t2013\t0002\t0.5\tHe said "no\tShe left.\textra\tfields',
    ]
    for suffix in (".csv", ".tsv"):
        path = tmp_path / f"pairs{suffix}"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        pairs = load_dataset(path)
        assert isinstance(pairs, SentencePairs)
        assert list(pairs.a) == ["A man is dancing.", 'He said "no']
        assert list(pairs.b) == ["A man dances.", "She left."]
        assert pairs.scores.tolist() == [5.0, 0.5]


def _npz(**arrays: np.ndarray):
    return lambda path: np.savez(path, **arrays)


def _text(content: str):
    return lambda path: path.write_text(content, encoding="utf-8")


def _bytes(content: bytes):
    return lambda path: path.write_bytes(content)


def _npy(array: np.ndarray):
    def write(path: Path) -> None:
        with path.open("wb") as handle:  # a handle, so np.save keeps the .npz name
            np.save(handle, array)

    return write


def _zip(name: str, content: bytes, method: int = zipfile.ZIP_STORED) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w", compression=method) as archive:
            archive.writestr(name, content)

    return write


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


GOOD_IMAGES = np.zeros((2, 4, 4, 3), dtype=np.uint8)
BOMB_SHAPE = (100, 1000, 1000, 3)
"""300 MB of zeros declared; np.savez_compressed stores them in about 300 KB."""
ALLOCATION_CEILING = 20 * 1024 * 1024
"""What refusing a dataset may allocate at its peak: far below any declared size tested here."""
ROW = "g\tf\t2012\t1\t{score}\tone\ttwo\n"


@pytest.mark.parametrize(
    ("name", "write", "fragment"),
    [
        ("absent.npz", None, "does not exist"),
        ("data.json", _text("{}"), "unknown dataset type '.json'"),
        ("corrupt.npz", _bytes(os.urandom(64)), "not a readable .npz archive"),
        ("single.npz", _npy(GOOD_IMAGES), "single array"),
        ("noimages.npz", _npz(pixels=GOOD_IMAGES), "no 'images'"),
        ("float.npz", _npz(images=GOOD_IMAGES.astype(np.float32)), "expected uint8"),
        ("gray.npz", _npz(images=GOOD_IMAGES[..., 0]), "expected uint8 (N, H, W, 3)"),
        ("empty.npz", _npz(images=GOOD_IMAGES[:0]), "no images"),
        ("count.npz", _npz(images=GOOD_IMAGES, labels=np.array([1])), "1 labels for 2 images"),
        ("floatlabels.npz", _npz(images=GOOD_IMAGES, labels=np.array([0.0, 1.0])), "integers"),
        ("negative.npz", _npz(images=GOOD_IMAGES, labels=np.array([0, -1])), "negative"),
        ("object.npz", _npz(images=np.array([None, 1], dtype=object)), "Python objects"),
        (
            "bzip2.npz",
            _zip("images.npy", _npy_bytes(GOOD_IMAGES), zipfile.ZIP_BZIP2),
            "compression method",
        ),
        ("lying.npz", _zip("images.npy", _npy_header((2, 4, 4, 3)) + bytes(8)), "do not match"),
        ("member.npz", _zip("images.npy", b"not an array"), "not a readable .npz archive"),
        ("few.tsv", _text("a\tb\t5.0\tx\n"), "line 1 has 4 tab-separated fields"),
        ("score.csv", _text(ROW.format(score="1") + ROW.format(score="high")), "line 2"),
        ("nan.csv", _text(ROW.format(score="nan")), "expected a number"),
        ("empty.csv", _text("\n\n"), "no sentence pairs"),
        ("latin1.tsv", _bytes(ROW.format(score="1").encode() + b"caf\xe9\n"), "UTF-8"),
    ],
)
def test_bad_datasets_raise_one_line_naming_the_file(
    tmp_path: Path, name: str, write, fragment: str
) -> None:
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(BadDataset) as info:
        load_dataset(path)
    message = str(info.value)
    assert fragment in message
    assert str(path) in message
    assert "\n" not in message


def _refused(path: Path, **limits: int) -> tuple[BadDataset, int]:
    """The error reading `path` raises and the peak of what was allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(BadDataset) as info:
            load_dataset(path, **limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return info.value, peak


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    np.savez_compressed(path, images=np.zeros(BOMB_SHAPE, dtype=np.uint8))
    return path


def test_a_compression_bomb_is_refused_from_its_headers_without_allocating(bomb: Path) -> None:
    declared = math.prod(BOMB_SHAPE)
    assert bomb.stat().st_size * BOMB_RATIO < declared

    error, peak = _refused(bomb)

    assert peak < ALLOCATION_CEILING < declared
    assert f"{BOMB_RATIO}:1 compression ratio" in str(error)
    assert str(bomb) in str(error)


def test_a_header_declaring_more_than_the_archive_holds_is_refused_without_allocating(
    tmp_path: Path,
) -> None:
    path = tmp_path / "liar.npz"
    _zip("images.npy", _npy_header(BOMB_SHAPE) + bytes(64))(path)

    error, peak = _refused(path)

    assert peak < ALLOCATION_CEILING
    assert "(100, 1000, 1000, 3)" in str(error) and "do not match" in str(error)


def test_a_dataset_declaring_more_than_max_bytes_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    np.savez(path, images=GOOD_IMAGES, labels=np.array([0, 1]))
    declared = sum(info.file_size for info in zipfile.ZipFile(path).infolist())

    with pytest.raises(DatasetTooLarge) as info:
        load_dataset(path, max_bytes=declared - 1)

    assert f"limit of {declared - 1} bytes" in str(info.value)
    assert str(path) in str(info.value)
    assert len(load_dataset(path, max_bytes=declared)) == 2


def test_a_sentence_file_above_max_bytes_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text(ROW.format(score="1") * 3, encoding="utf-8")
    size = path.stat().st_size

    with pytest.raises(DatasetTooLarge, match=f"limit of {size - 1} bytes"):
        load_dataset(path, max_bytes=size - 1)
    assert len(load_dataset(path, max_bytes=size)) == 3


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_named_npz_say_how_to_save_without_mentioning_pickles(
    tmp_path: Path, seed: int
) -> None:
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(seed).bytes(256))

    with pytest.raises(BadDataset) as info:
        load_dataset(path)

    message = str(info.value)
    assert "np.savez(path, images=..., labels=...)" in message
    assert "pickle" not in message.lower()


@pytest.mark.parametrize(
    ("limit", "value", "content", "fragment"),
    [
        ("MAX_LINE_CHARS", 40, ROW.format(score="1") + "x" * 41 + "\n", "line 2 is longer than 40"),
        ("MAX_PAIR_LINES", 3, ROW.format(score="1") * 4, "line 4 is past the limit of 3 lines"),
    ],
)
def test_sentence_files_beyond_the_line_limits_are_refused_naming_the_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limit: str,
    value: int,
    content: str,
    fragment: str,
) -> None:
    monkeypatch.setattr(readers, limit, value)
    path = tmp_path / "pairs.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BadDataset, match=fragment):
        load_dataset(path)


def test_a_sentence_file_without_line_ends_is_refused_without_reading_it_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "one-line.tsv"
    path.write_text("x" * ALLOCATION_CEILING, encoding="utf-8")

    error, peak = _refused(path)

    assert peak < ALLOCATION_CEILING / 4
    assert "line 1 is longer than" in str(error)


def test_datasets_built_in_memory_are_checked_too() -> None:
    with pytest.raises(BadDataset, match="one score per pair"):
        SentencePairs(["a"], ["b", "c"], np.array([1.0]))


# --- calibration ------------------------------------------------------------------------------


def test_calibration_draws_n_seeded_samples_in_batches() -> None:
    model = image_model()
    dataset = ImageSet(images_brightest_in([0, 1, 2] * 4))

    batches = calibration_batches(dataset, model, n=5, batch_size=2, seed=3)

    assert [batch.shape for batch in batches] == [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
    drawn = torch.cat(batches)[:, 0, 0, 0] * 255  # pixel (0, 0) holds the image index
    assert len(set(drawn.round().tolist())) == 5
    again = torch.cat(calibration_batches(dataset, model, n=5, batch_size=2, seed=3))
    other = torch.cat(calibration_batches(dataset, model, n=5, batch_size=2, seed=4))
    assert torch.equal(torch.cat(batches), again)
    assert not torch.equal(torch.cat(batches), other)


def test_calibration_takes_all_samples_when_asked_for_more() -> None:
    dataset = ImageSet(images_brightest_in([0, 1, 2]))
    batches = calibration_batches(dataset, image_model(), n=100, batch_size=64)
    assert sum(len(batch) for batch in batches) == 3


def test_holdout_samples_are_the_ones_calibration_did_not_draw() -> None:
    model = image_model()
    dataset = ImageSet(images_brightest_in([0, 1, 2] * 4))

    def drawn(batches: list[torch.Tensor]) -> set[int]:
        return set((torch.cat(batches)[:, 0, 0, 0] * 255).round().int().tolist())

    calibration = drawn(calibration_batches(dataset, model, n=5, batch_size=2, seed=3))
    holdout = drawn(holdout_batches(dataset, model, n=5, batch_size=2, seed=3))
    assert len(holdout) == 5 and not calibration & holdout
    rest = drawn(holdout_batches(dataset, model, n=10, batch_size=4, seed=3))
    assert rest == set(range(12)) - drawn(
        calibration_batches(dataset, model, n=10, batch_size=4, seed=3)
    )
    assert holdout_batches(dataset, model, n=12, batch_size=4) == []


def test_calibration_on_sentence_pairs_uses_both_columns() -> None:
    text, pairs = sts_model_and_pairs([1.0, 2.0, 3.0])
    batches = calibration_batches(pairs, text.model, n=6, batch_size=4)
    assert [len(batch["ids"]) for batch in batches] == [4, 2]
    assert sorted(text.seen) == sorted([*pairs.a, *pairs.b])


@pytest.mark.parametrize("build", ["calibration", "evalset"])
def test_dataset_of_the_wrong_kind_for_the_model_is_refused(build: str) -> None:
    text, pairs = sts_model_and_pairs([1.0, 2.0])
    images = ImageSet(images_brightest_in([0, 1]))
    for dataset, model, fragment in (
        (images, text.model, "takes text inputs but the dataset holds images; give a .csv"),
        (pairs, image_model(), "takes image inputs but the dataset holds sentence pairs; give an"),
        (TextCorpus(["some text"]), image_model(), "holds text; give an .npz of images"),
    ):
        with pytest.raises(BadDataset, match=fragment):
            if build == "calibration":
                calibration_batches(dataset, model, n=2, batch_size=2)
            else:
                EvalSet(dataset, model)


# --- evaluation -------------------------------------------------------------------------------


def test_top1_on_labelled_images_in_uneven_batches() -> None:
    dataset = ImageSet(images_brightest_in([0, 1, 2, 1]), np.array([0, 1, 2, 0]))
    evalset = EvalSet(dataset, image_model(), batch_size=3)
    assert evalset.primary_metric == "top1"
    assert evaluate(image_model(), evalset) == {"top1": 75.0}
    assert EvalSet(dataset, image_model(), limit=3).size == 3
    assert evaluate(image_model(), EvalSet(dataset, image_model(), limit=3))["top1"] == 100.0


def test_labels_beyond_the_models_classes_are_refused() -> None:
    dataset = ImageSet(images_brightest_in([0, 1]), np.array([0, 5]))
    with pytest.raises(BadDataset, match="labels go up to 5 but test:channel-means has 3"):
        EvalSet(dataset, image_model())


def test_unlabelled_images_are_scored_against_the_fp32_outputs() -> None:
    model = image_model()
    evalset = EvalSet(ImageSet(images_brightest_in([0, 1, 2, 1])), model, batch_size=3)
    assert evalset.primary_metric == "agreement"
    with pytest.raises(ValueError, match="reference"):
        evaluate(model, evalset)

    reference = evalset.outputs(model)
    same = evaluate(model, evalset, reference)
    assert same["agreement"] == 100.0
    assert abs(same["kl"]) < 1e-12
    flipped = evaluate(lambda x: -model(x), evalset, reference)
    assert flipped["agreement"] == 0.0
    assert flipped["kl"] > 0.1


def test_labelled_images_with_reference_report_all_classification_metrics() -> None:
    model = image_model()
    evalset = EvalSet(ImageSet(images_brightest_in([0, 1]), np.array([0, 0])), model)
    metrics = evaluate(model, evalset, evalset.outputs(model))
    assert metrics.keys() == {"top1", "agreement", "kl"}
    assert metrics.keys() <= HIGHER_IS_BETTER.keys()


def test_kl_and_top1_known_values() -> None:
    reference = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = (1/4, 3/4)
    uniform = torch.zeros(1, 2)  # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl_divergence(reference, uniform) == pytest.approx(expected, rel=1e-12)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert top1(logits, torch.tensor([0, 0, 0])) == pytest.approx(200 / 3)


def test_embeddings_of_images_are_scored_by_mse_to_the_reference() -> None:
    model = image_model(num_classes=None, task="embedding")
    evalset = EvalSet(ImageSet(images_brightest_in([0, 1])), model)
    assert evalset.primary_metric == "mse"
    reference = evalset.outputs(model)
    assert evaluate(lambda x: model(x) + 0.5, evalset, reference) == {"mse": pytest.approx(0.25)}


def test_sts_spearman_follows_cosine_order_through_length_sorted_batches() -> None:
    gold = [3.0, 0.5, 4.5, 1.0, 2.0, 5.0, 0.0]
    text, pairs = sts_model_and_pairs(gold)
    evalset = EvalSet(pairs, text.model, batch_size=3)
    assert evalset.primary_metric == "spearman"
    assert evaluate(text.model, evalset)["spearman"] == pytest.approx(100.0)
    reversed_pairs = SentencePairs(pairs.a, pairs.b, -pairs.scores)
    reversed_set = EvalSet(reversed_pairs, text.model, batch_size=3)
    assert evaluate(text.model, reversed_set)["spearman"] == pytest.approx(-100.0)


# --- shared data --------------------------------------------------------------------------------


@needs_shared_data
@pytest.mark.integration
def test_shared_datasets_read_with_their_documented_sizes() -> None:
    dev = load_dataset(SHARED_DATA / "stsb" / "sts-dev.csv")
    train = load_dataset(SHARED_DATA / "stsb" / "sts-train.csv")
    cifar = load_dataset(SHARED_DATA / "cifar10" / "calib_train_jpeg.npz")
    assert (len(dev), len(train), len(cifar)) == (1500, 5749, 2000)
    assert dev.scores.min() >= 0.0 and dev.scores.max() <= 5.0
    assert np.bincount(cifar.labels).tolist() == [200] * 10
